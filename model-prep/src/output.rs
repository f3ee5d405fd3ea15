//! Atomic output directories: write into a hidden sibling, rename into place at the end.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("output directory {0} exists and is not empty (pass --force to replace it)")]
    NotEmpty(PathBuf),
    #[error("output path {0} exists and is not a directory")]
    NotADirectory(PathBuf),
    #[error("cannot create a staging directory beside {path}: {source}")]
    Staging {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot move the finished model into {path}: {source}")]
    Commit {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A directory being written. Dropped without [`StagedDir::commit`], it is deleted.
#[derive(Debug)]
pub struct StagedDir {
    staging: Option<tempfile::TempDir>,
    destination: PathBuf,
}

impl StagedDir {
    /// Checks that `destination` may be written (absent, or an empty directory, or any
    /// directory when `force`), and creates the staging directory on the same filesystem.
    pub fn new(destination: &Path, force: bool) -> Result<Self, OutputError> {
        if destination.exists() {
            if !destination.is_dir() {
                return Err(OutputError::NotADirectory(destination.to_path_buf()));
            }
            let empty = std::fs::read_dir(destination)
                .map(|mut entries| entries.next().is_none())
                .unwrap_or(false);
            if !empty && !force {
                return Err(OutputError::NotEmpty(destination.to_path_buf()));
            }
        }
        let parent = match destination.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let staging_error = |source| OutputError::Staging {
            path: destination.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(&parent).map_err(staging_error)?;
        let name = destination
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let staging = tempfile::Builder::new()
            .prefix(&format!(".{name}.partial-"))
            .tempdir_in(&parent)
            .map_err(staging_error)?;
        Ok(StagedDir {
            staging: Some(staging),
            destination: destination.to_path_buf(),
        })
    }

    /// Where to write the files.
    pub fn path(&self) -> &Path {
        self.staging
            .as_ref()
            .expect("staging directory exists until commit consumes self")
            .path()
    }

    pub fn destination(&self) -> &Path {
        &self.destination
    }

    /// Moves the finished directory to its destination (replacing an existing one).
    pub fn commit(mut self) -> Result<PathBuf, OutputError> {
        let staging = self
            .staging
            .take()
            .expect("staging directory exists until commit consumes self");
        let commit_error = |source| OutputError::Commit {
            path: self.destination.clone(),
            source,
        };
        if self.destination.exists() {
            std::fs::remove_dir_all(&self.destination).map_err(commit_error)?;
        }
        let staged = staging.keep();
        std::fs::rename(&staged, &self.destination).map_err(|source| {
            let _ = std::fs::remove_dir_all(&staged);
            commit_error(source)
        })?;
        Ok(self.destination.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_moves_and_drop_cleans_up() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("model");
        let staged = StagedDir::new(&dest, false).unwrap();
        std::fs::write(staged.path().join("config.json"), "{}").unwrap();
        assert!(!dest.exists(), "nothing appears before commit");
        staged.commit().unwrap();
        assert!(dest.join("config.json").exists());

        let dropped = StagedDir::new(&root.path().join("other"), false).unwrap();
        let staging_path = dropped.path().to_path_buf();
        drop(dropped);
        assert!(!staging_path.exists());
        assert!(!root.path().join("other").exists());
    }

    #[test]
    fn refuses_non_empty_destination_unless_forced() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("x"), "1").unwrap();
        let err = StagedDir::new(root.path(), false).unwrap_err();
        assert!(err.to_string().contains("not empty"), "{err}");
        assert!(StagedDir::new(root.path(), true).is_ok());
        let err = StagedDir::new(&root.path().join("x"), false).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
    }
}
