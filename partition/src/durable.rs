//! Small metadata files (`PARTITION`, `CURRENT`, `FAULT`, the fault
//! journal): replaced so that a crash leaves the old contents or the new,
//! never a mix (temp file, write, sync, rename, directory sync), and read
//! back as text.

use std::path::Path;

use bytes::Bytes;
use datanode_wal::Storage;

/// Replaces `dir/name` with `contents`, durably and atomically.
pub fn replace_file(storage: &dyn Storage, dir: &Path, name: &str, contents: String) -> std::io::Result<()> {
    let temp = dir.join(format!("{name}.tmp"));
    let file = storage.open(&temp, true)?;
    file.set_len(0)?;
    file.write_all_and_sync(0, &[Bytes::from(contents)]).map_err(|(_, e)| e)?;
    storage.rename(&temp, &dir.join(name))?;
    storage.sync_dir(dir)
}

/// The first `max` bytes of `path` as text (invalid UTF-8 replaced);
/// `None` when there is no such file.
pub fn read_small_file(storage: &dyn Storage, path: &Path, max: usize) -> std::io::Result<Option<String>> {
    let file = match storage.open(path, false) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let len = usize::try_from(file.file_len()?).unwrap_or(usize::MAX).min(max);
    Ok(Some(String::from_utf8_lossy(&file.read_exact_at(0, len)?).into_owned()))
}
