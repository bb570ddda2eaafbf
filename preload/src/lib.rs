//! libtether.so
