//! tetherd: the local identity broker, and the shared code of the `tether` CLI.
#![forbid(unsafe_code)]
