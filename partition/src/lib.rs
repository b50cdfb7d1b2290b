//! `datanode-partition`: data partitions over the WAL.
//!
//! This crate will hold the blob store, the partition and disk health state
//! machines, the registry, snapshots and compaction (see `ARCHITECTURE.md`).
//! It is not built yet and exports nothing.
