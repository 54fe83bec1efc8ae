//! One Steward node, wired: the validated configuration, the store, the engine, the API on
//! its listener, and the supervised components around them (the e-stop service, the policy
//! watcher, error budgets, notifications, job containment). [`Node::start`] is the one way a
//! node starts: `steward serve`, the benchmarks and the tests all go through it, so what they
//! measure and check is what users run.

pub mod config;
pub mod pidfile;
pub mod serve;

mod budgets;
mod notify;
mod policies;
mod sdnotify;

pub use serve::{ADMIN_TOKEN_FILE, Node, serve};
