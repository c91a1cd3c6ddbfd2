//! rustci-net (being written)
