//! (filled in by the admin work of issue 10)
