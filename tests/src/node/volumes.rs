//! Volumes written as the kubelet writes them (its `AtomicWriter`): the payload goes into a
//! fresh timestamped directory `..<time>`, the `..data` symlink is switched to it with one
//! `rename` (atomic), every key is a symlink `key -> ..data/key`, and the previous directory is
//! removed. A reader holding `config.json` open keeps its old file; one opening the path again
//! sees the whole new version, never half of it.

use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{Error, Result};

const DATA_LINK: &str = "..data";
const DATA_TMP_LINK: &str = "..data_tmp";

/// Writes `files` (key → bytes) into volume directory `dir` atomically. Writing the same
/// payload again changes nothing on disk. Keys must be plain file names.
pub fn write_atomic(dir: &Path, files: &BTreeMap<String, Vec<u8>>) -> Result<bool> {
    for key in files.keys() {
        if key.is_empty() || key.contains('/') || key.starts_with("..") {
            return Err(Error::Unexpected(format!(
                "volume key {key:?} is not a plain file name"
            )));
        }
    }
    let io = |what: String| move |source| Error::io(what, source);
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    let current = std::fs::read_link(dir.join(DATA_LINK)).ok();
    if let Some(current) = &current
        && same_payload(&dir.join(current), files)
    {
        return Ok(false);
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let stamp = format!("..{nanos}");
    let payload_dir = dir.join(&stamp);
    std::fs::create_dir(&payload_dir).map_err(io(format!("create {}", payload_dir.display())))?;
    for (key, bytes) in files {
        let path = payload_dir.join(key);
        std::fs::write(&path, bytes).map_err(io(format!("write {}", path.display())))?;
    }
    // The temporary link is named after the payload, so two writers of one volume (the
    // ConfigMap watch and a pod's first write) never trip over each other's; the last rename
    // wins, as it would with one writer.
    let tmp = dir.join(format!("{DATA_TMP_LINK}{stamp}"));
    let _ = std::fs::remove_file(&tmp);
    symlink(&stamp, &tmp).map_err(io(format!("link {}", tmp.display())))?;
    std::fs::rename(&tmp, dir.join(DATA_LINK))
        .map_err(io(format!("switch {}/..data", dir.display())))?;
    for key in files.keys() {
        let link = dir.join(key);
        if std::fs::symlink_metadata(&link).is_err() {
            match symlink(Path::new(DATA_LINK).join(key), &link) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    return Err(Error::io(format!("link {}", link.display()), e));
                }
                _ => {}
            }
        }
    }
    remove_stale_keys(dir, files)?;
    if let Some(old) = current {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(true)
}

fn same_payload(payload_dir: &Path, files: &BTreeMap<String, Vec<u8>>) -> bool {
    let Ok(entries) = std::fs::read_dir(payload_dir) else {
        return false;
    };
    let count = entries.count();
    count == files.len()
        && files
            .iter()
            .all(|(key, bytes)| std::fs::read(payload_dir.join(key)).is_ok_and(|b| &b == bytes))
}

fn remove_stale_keys(dir: &Path, files: &BTreeMap<String, Vec<u8>>) -> Result<()> {
    let entries = std::fs::read_dir(dir)
        .map_err(|source| Error::io(format!("list {}", dir.display()), source))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !files.contains_key(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// The files of a ConfigMap volume: `data` as UTF-8 bytes and `binaryData` as is, limited to
/// `items` (key → path) when the volume lists them.
pub fn config_map_files(
    data: Option<&BTreeMap<String, String>>,
    binary: Option<&BTreeMap<String, k8s_openapi::ByteString>>,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
) -> BTreeMap<String, Vec<u8>> {
    let mut all: BTreeMap<String, Vec<u8>> = data
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    all.extend(
        binary
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone())),
    );
    match items {
        Some(items) if !items.is_empty() => items
            .iter()
            .filter_map(|item| all.get(&item.key).map(|b| (item.path.clone(), b.clone())))
            .collect(),
        _ => all,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn keys_are_symlinks_through_data_to_a_timestamped_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write_atomic(dir.path(), &files(&[("config.json", "{}")])).unwrap());
        let data = std::fs::read_link(dir.path().join("..data")).unwrap();
        assert!(data.to_string_lossy().starts_with(".."), "{data:?}");
        assert_eq!(
            std::fs::read_link(dir.path().join("config.json")).unwrap(),
            Path::new("..data/config.json")
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("config.json")).unwrap(),
            "{}"
        );
    }

    #[test]
    fn an_update_swaps_the_payload_and_removes_the_old_one_and_stale_keys() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), &files(&[("a", "1"), ("b", "2")])).unwrap();
        let first = std::fs::read_link(dir.path().join("..data")).unwrap();
        assert!(!write_atomic(dir.path(), &files(&[("a", "1"), ("b", "2")])).unwrap());
        assert!(write_atomic(dir.path(), &files(&[("a", "3")])).unwrap());
        let second = std::fs::read_link(dir.path().join("..data")).unwrap();
        assert_ne!(first, second);
        assert!(!dir.path().join(&first).exists());
        assert!(std::fs::symlink_metadata(dir.path().join("b")).is_err());
        assert_eq!(std::fs::read_to_string(dir.path().join("a")).unwrap(), "3");
    }

    #[test]
    fn two_writers_of_one_volume_leave_one_whole_payload() {
        let dir = tempfile::tempdir().unwrap();
        let writers: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|value| {
                let dir = dir.path().to_owned();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let payload = files(&[("k", &format!("{value}{i}")), ("v", value)]);
                        write_atomic(&dir, &payload).unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        let k = std::fs::read_to_string(dir.path().join("k")).unwrap();
        let v = std::fs::read_to_string(dir.path().join("v")).unwrap();
        assert!(
            k.starts_with(&v),
            "k={k} v={v}: both files from one payload"
        );
    }

    #[test]
    fn a_key_that_escapes_the_volume_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write_atomic(dir.path(), &files(&[("../x", "1")])).is_err());
        assert!(write_atomic(dir.path(), &files(&[("..data", "1")])).is_err());
    }
}
