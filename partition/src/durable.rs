//! Replacing a small file so that a crash leaves the old contents or the
//! new, never a mix: temp file, write, sync, rename, directory sync.

use std::path::Path;

use bytes::Bytes;
use datanode_wal::Storage;

/// Replaces `dir/name` with `contents`, durably and atomically.
pub(crate) fn replace_file(storage: &dyn Storage, dir: &Path, name: &str, contents: String) -> std::io::Result<()> {
    let temp = dir.join(format!("{name}.tmp"));
    let file = storage.open(&temp, true)?;
    file.set_len(0)?;
    file.write_all_and_sync(0, &[Bytes::from(contents)]).map_err(|(_, e)| e)?;
    storage.rename(&temp, &dir.join(name))?;
    storage.sync_dir(dir)
}
