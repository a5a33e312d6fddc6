//! Configuration: the TOML file, defaults and validation.
