//! Reading the small local files the crate is pointed at (a workload identity's federated
//! token, the Arc agent's key, a client certificate, a root certificate file): they are
//! outside input like any answer, so only a regular file is read at all, and the read is
//! capped in size (and, from async code, in time). A FIFO would block the read for ever,
//! `/dev/zero` would never end, and opening some devices has effects of its own; all are
//! refused before they are opened.

use std::io::{self, Read as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long opening and reading one such file may take from async code (a slow network file
/// system, say). The blocking read itself cannot be cut short; the caller stops waiting.
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The file's bytes, at most `max_bytes`; else why not, in words that follow the file's name
/// (the system's own errors keep their kind: `PermissionDenied`, `NotFound`). Waits at most
/// [`READ_TIMEOUT`].
pub(crate) async fn read_capped(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    let owned: PathBuf = path.to_owned();
    let read = tokio::task::spawn_blocking(move || read_capped_blocking(&owned, max_bytes));
    match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(io::Error::other(join.to_string())),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("reading it took longer than {READ_TIMEOUT:?}"),
        )),
    }
}

/// As [`read_capped`], on the calling thread, for code that is not async (building a
/// connector, loading a certificate).
pub(crate) fn read_capped_blocking(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    // What the path names now (links followed: Kubernetes projects its tokens through them).
    let named = std::fs::metadata(path)?;
    if !named.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("it is {}, not a regular file", describe(&named)),
        ));
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    // Should the path be swapped for a FIFO or a terminal after the check: do not wait for a
    // writer, do not take a controlling terminal.
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let file = options.open(path)?;
    let opened = file.metadata()?;
    if !opened.is_file() || !same_file(&named, &opened) {
        return Err(io::Error::other("it changed while it was being opened"));
    }
    let mut bytes = Vec::new();
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("it is larger than {max_bytes} bytes"),
        ));
    }
    Ok(bytes)
}

#[cfg(unix)]
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_file(_: &std::fs::Metadata, _: &std::fs::Metadata) -> bool {
    true
}

/// What kind of file system object this is, for the error.
fn describe(metadata: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        let kind = metadata.file_type();
        if kind.is_fifo() {
            return "a FIFO";
        }
        if kind.is_char_device() {
            return "a character device";
        }
        if kind.is_block_device() {
            return "a block device";
        }
        if kind.is_socket() {
            return "a socket";
        }
    }
    if metadata.is_dir() {
        "a directory"
    } else {
        "something else"
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_small_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "eyJ.a.b").unwrap();
        assert_eq!(read_capped(&file, 64).await.unwrap(), b"eyJ.a.b");
        // Through a link, as Kubernetes projects its tokens.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(read_capped_blocking(&link, 64).unwrap(), b"eyJ.a.b");
        assert_eq!(
            read_capped(&file, 3).await.unwrap_err().to_string(),
            "it is larger than 3 bytes"
        );
        assert_eq!(
            read_capped(Path::new("/dev/zero"), 64)
                .await
                .unwrap_err()
                .to_string(),
            "it is a character device, not a regular file"
        );
        assert_eq!(
            read_capped_blocking(dir.path(), 64)
                .unwrap_err()
                .to_string(),
            "it is a directory, not a regular file"
        );
        // A FIFO with no writer: refused at once instead of waiting for one.
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        assert_eq!(
            read_capped_blocking(&fifo, 64).unwrap_err().to_string(),
            "it is a FIFO, not a regular file"
        );
    }
}
