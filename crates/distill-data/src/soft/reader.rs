//! Reading a store without loading it: a key index over shards and staged records.

use super::*;

#[derive(Debug, Clone, Copy)]
pub(super) enum Loc {
    Shard { shard: u32, sample: u32 },
    Staged { at: u64, len: u64 },
}

/// Reads a soft-label store without loading it: shards are memory-mapped, only a key index is
/// built, and [`SoftLabels::get`] decodes one sample when asked.
pub struct SoftLabels {
    pub(super) dir: PathBuf,
    pub(super) manifest: SoftManifest,
    pub(super) shards: Vec<ShardMap>,
    pub(super) staging: Option<Mutex<File>>,
    pub(super) staging_path: PathBuf,
    pub(super) index: HashMap<String, Loc>,
}

impl std::fmt::Debug for SoftLabels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftLabels")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("samples", &self.index.len())
            .finish()
    }
}

impl SoftLabels {
    /// Opens the soft-label directory `dir` (`<dataset>/soft`).
    pub fn open(dir: &Path) -> Result<SoftLabels, SoftError> {
        let manifest = SoftManifest::read(dir)?.ok_or_else(|| {
            format_err(
                &dir.join(MANIFEST_FILE),
                "no soft-label manifest: this dataset has no soft labels (gen-data writes them with [soft_labels] enabled)",
            )
        })?;
        let mut index = HashMap::new();
        let mut shards = Vec::new();
        for (i, path) in list_soft_shards(dir)?.iter().enumerate() {
            let shard = ShardMap::open(path, manifest.k)?;
            for (s, key) in shard.keys.iter().enumerate() {
                index.insert(
                    key.clone(),
                    Loc::Shard {
                        shard: i as u32,
                        sample: s as u32,
                    },
                );
            }
            shards.push(shard);
        }
        let staging_path = dir.join(STAGING_FILE);
        let next_shard = shards
            .last()
            .and_then(|s| shard_number(&s.path))
            .map_or(0, |n| n + 1);
        let staging = match File::open(&staging_path) {
            Ok(mut f) => {
                // Staged records count only if their shard was not written yet.
                if let Some((next, staged, _)) = scan_staging(&mut f, &staging_path, manifest.k)?
                    && next == next_shard
                {
                    for s in staged {
                        index.insert(
                            s.key,
                            Loc::Staged {
                                at: s.body_at,
                                len: s.body_len,
                            },
                        );
                    }
                }
                Some(Mutex::new(f))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&staging_path)(e)),
        };
        Ok(SoftLabels {
            dir: dir.to_path_buf(),
            manifest,
            shards,
            staging,
            staging_path,
            index,
        })
    }

    pub fn manifest(&self) -> &SoftManifest {
        &self.manifest
    }

    /// Samples with soft labels.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Every key with soft labels, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// One sample's labels, decoded to f32; None when the key has none.
    pub fn get(&self, key: &str) -> Result<Option<SoftRecord>, SoftError> {
        match self.index.get(key) {
            None => Ok(None),
            Some(&Loc::Shard { shard, sample }) => {
                self.shards[shard as usize].record(sample as usize).map(Some)
            }
            Some(&Loc::Staged { at, len }) => {
                let file = self.staging.as_ref().expect("indexed staged records have a file");
                let mut file = file.lock().expect("staging file lock");
                let staged = Staged {
                    key: key.to_string(),
                    body_at: at,
                    body_len: len,
                    tokens: 0,
                };
                let body = read_body(&mut file, &self.staging_path, &staged)?;
                let b = decode_body(&body).ok_or_else(|| {
                    format_err(&self.staging_path, format!("record for key {key} is corrupt"))
                })?;
                Ok(Some(record_from_parts(
                    b.ids,
                    b.k,
                    b.top_ids,
                    b.top_logprobs,
                    b.dtype,
                )))
            }
        }
    }
}
