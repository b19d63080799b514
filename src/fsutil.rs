//! Writing files that hold secrets or that readers must never see half-written.

use ring::rand::{SecureRandom, SystemRandom};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct FileError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn at(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError { path: path.to_path_buf(), source }
}

/// Writes `data` to `path` (mode 0600) so that readers see the old or the
/// new content, never a mix, and a crash leaves one of them on disk.
pub fn write_atomically(path: &Path, data: &[u8]) -> Result<(), FileError> {
    write_atomically_with_mode(path, data, 0o600)
}

pub fn write_atomically_with_mode(path: &Path, data: &[u8], mode: u32) -> Result<(), FileError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut suffix = [0u8; 6];
    let _ = SystemRandom::new().fill(&mut suffix);
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned()),
        crate::text::hex(&suffix)
    ));
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(at(&tmp))?;
        // The umask may have narrowed `mode`; a public certificate should stay readable.
        file.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(at(&tmp))?;
        file.write_all(data).map_err(at(&tmp))?;
        file.sync_all().map_err(at(&tmp))?;
        std::fs::rename(&tmp, path).map_err(at(path))?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
