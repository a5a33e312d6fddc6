//! (filled in by the sni work of issue 10)
