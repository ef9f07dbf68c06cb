//! Free space on the data directory's file system. Writes that add data (documents,
//! attachment chunks, index rows, compaction) are refused while less than the reserve is free,
//! before they reach the engine: an engine that hits ENOSPC mid-write poisons itself (fjall
//! refuses everything until reopened), whereas a refused batch leaves it healthy, so writes
//! work again as soon as space is freed, without a restart. The reserve covers what the engine
//! writes on its own (memtable flushes, compactions, the journal's next file).

use super::{Result, StoreError};
use std::path::{Path, PathBuf};

/// The reserve when none is configured: the node-wide write buffer flushed twice over.
pub const DEFAULT_RESERVE: u64 = 128 << 20;

#[derive(Debug)]
pub struct Space {
    dir: PathBuf,
    reserve: u64,
}

impl Space {
    pub fn new(dir: &Path, reserve: u64) -> Space {
        Space {
            dir: dir.to_path_buf(),
            reserve,
        }
    }

    /// Bytes an unprivileged writer may still use on the data directory's file system.
    pub fn free(&self) -> std::io::Result<u64> {
        free_bytes(&self.dir)
    }

    /// `Err(StoreError::Full)` while less than the reserve is free. A file system that cannot
    /// say (statvfs failing) does not block writes: the engine's own error would follow.
    pub fn check(&self) -> Result<()> {
        match self.free() {
            Ok(free) if free < self.reserve => Err(StoreError::Full(format!(
                "the node's disk is full: {} MiB free on the data directory's file system, \
                 writes need {} MiB (--min-free-space); free space and retry",
                free >> 20,
                self.reserve >> 20
            ))),
            _ => Ok(()),
        }
    }
}

fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: a NUL-terminated path and a buffer of the struct's size, written by the call.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let st = unsafe { st.assume_init() };
    // The field types differ between targets (32-bit ones have narrower counts).
    #[allow(clippy::unnecessary_cast)]
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserve_larger_than_the_disk_refuses_and_zero_allows() {
        let dir = std::env::temp_dir();
        assert!(Space::new(&dir, 0).check().is_ok());
        let err = Space::new(&dir, u64::MAX).check().unwrap_err();
        assert!(matches!(err, StoreError::Full(_)), "{err}");
        assert!(err.to_string().contains("disk is full"), "{err}");
    }
}
