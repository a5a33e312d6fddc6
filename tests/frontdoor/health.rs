//! (filled in by the health work of issue 10)
