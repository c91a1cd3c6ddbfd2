//! rustci-storage (being written)
