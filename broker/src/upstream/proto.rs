//! The SPIRE Delegated Identity API, generated at build time from `broker/proto/` (build.rs).
//! The modules mirror the protobuf packages, as the generated code's paths require.
#![allow(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    clippy::all,
    clippy::pedantic
)]

pub mod spire {
    pub mod api {
        pub mod types {
            tonic::include_proto!("spire.api.types");
        }
        pub mod agent {
            pub mod delegatedidentity {
                pub mod v1 {
                    tonic::include_proto!("spire.api.agent.delegatedidentity.v1");
                }
            }
        }
    }
}

pub use spire::api::agent::delegatedidentity::v1::*;
#[cfg(test)]
pub use spire::api::types;
