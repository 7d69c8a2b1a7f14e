//! Reading the small local files a credential is pointed at (the federated token of a
//! workload identity, the Arc agent's key): they are outside input like any answer, so the
//! read is capped in size and time, and only a regular file is read at all. A FIFO would
//! block the read for ever and `/dev/zero` would never end; both are refused before reading.

use std::path::Path;
use std::time::Duration;

use tokio::io::AsyncReadExt as _;

/// How long opening and reading one such file may take (a slow network file system, say).
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The file's bytes, at most `max_bytes`; else why not, in words that follow the file's name.
pub(crate) async fn read_capped(path: &Path, max_bytes: u64) -> Result<Vec<u8>, String> {
    let read = async {
        let mut options = tokio::fs::OpenOptions::new();
        options.read(true);
        // Opening a FIFO for reading waits for a writer; without blocking it returns at once,
        // and the type check below refuses it. A regular file reads as usual.
        #[cfg(unix)]
        options.custom_flags(libc::O_NONBLOCK);
        let file = options.open(path).await.map_err(|e| e.to_string())?;
        // The type of what was opened, not of what the path named a moment earlier.
        let metadata = file.metadata().await.map_err(|e| e.to_string())?;
        if !metadata.is_file() {
            return Err(format!("it is {}, not a regular file", describe(&metadata)));
        }
        let mut bytes = Vec::new();
        file.take(max_bytes.saturating_add(1))
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| e.to_string())?;
        if bytes.len() as u64 > max_bytes {
            return Err(format!("it is larger than {max_bytes} bytes"));
        }
        Ok(bytes)
    };
    tokio::time::timeout(READ_TIMEOUT, read)
        .await
        .map_err(|_| format!("reading it took longer than {READ_TIMEOUT:?}"))?
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
        assert_eq!(
            read_capped(&file, 3).await.unwrap_err(),
            "it is larger than 3 bytes"
        );
        assert_eq!(
            read_capped(Path::new("/dev/zero"), 64).await.unwrap_err(),
            "it is a character device, not a regular file"
        );
        assert_eq!(
            read_capped(dir.path(), 64).await.unwrap_err(),
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
            read_capped(&fifo, 64).await.unwrap_err(),
            "it is a FIFO, not a regular file"
        );
    }
}
