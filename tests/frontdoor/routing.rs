//! (filled in by the routing work of issue 10)
