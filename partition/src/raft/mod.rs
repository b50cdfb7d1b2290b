//! Raft storage of a replicated partition (openraft, pinned in
//! `Cargo.toml`): the log store over the partition's WAL and the durable
//! vote beside it.
//!
//! - [`types`]: the type configuration and the index <-> LSN mapping (the
//!   entry at index `i` is the WAL record at LSN `i + 1`).
//! - `codec`: the bytes of an entry inside its WAL record.
//! - `meta`: the `RAFT` file (vote, purged id, live log directory).
//! - [`LogStore`]: openraft's `RaftLogStorage` over a [`datanode_wal::Wal`],
//!   with the durability contracts stated there.
//! - [`MemStateMachine`]: a stand-in state machine (an in-memory map of
//!   applied blob records) until the partition's blob store takes its
//!   place.
//!
//! Not here: the network, which is the daemon's (this crate knows no
//! socket; openraft's messages are serde types, `Command` a byte string).
//! Not here yet: the `Raft` instance of a partition, and the
//! partition-backed state machine.

mod codec;
mod error;
mod log_store;
mod meta;
mod state_machine;
pub mod types;

pub use error::StoreError;
pub use log_store::{LogReader, LogStore};
pub use state_machine::MemStateMachine;
pub use types::{Command, Entry, LogId, TypeConfig, Vote, index_of, lsn_of};
