//! Wire types generated from `proto/steward/v1/steward.proto`, with serde in the proto3
//! JSON mapping (the HTTP/JSON API and `--json` output use it).

#![allow(clippy::all, clippy::pedantic, rust_2018_idioms, unused_qualifications)]

pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/steward.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/steward.v1.serde.rs"));
}

pub use pbjson_types;
