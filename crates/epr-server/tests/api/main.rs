//! Black-box tests: the real server on port 0 with a temporary data directory (or, with
//! `EPR_TEST_BACKEND=postgres`, a fresh PostgreSQL database: `helpers`), driven over
//! HTTP. One test binary (faster to link); one module per area.

mod auth_e2e;
mod auth_support;
mod backup;
mod batch;
mod child;
mod connections;
mod crash;
mod ecap;
mod endpoints;
mod events;
mod filters;
mod filters_nats;
mod fuzz_findings;
mod helpers;
mod integrity;
mod isolation;
mod metadata;
mod nats_protocols;
mod nats_support;
mod observability;
mod ops;
mod reload;
mod replicas;
mod security;
mod self_registration;
mod strict;
mod tekton;
mod tenancy_nats;
mod tokens;
