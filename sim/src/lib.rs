//! rustci-sim (being written)
