//! One client connection: state machine and relay.
