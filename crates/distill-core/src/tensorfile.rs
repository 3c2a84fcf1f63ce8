//! A safetensors file written one tensor at a time: the header first (every name and shape is
//! known up front), then each tensor made, encoded and written in turn. Host memory holds one
//! tensor, not the model: a 7B export built every tensor in f32 and then all of them encoded,
//! about 45 GB at once.

use std::io::{BufWriter, Write};
use std::path::Path;

/// The element type a file stores; values are made as f32 and rounded once when written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileDtype {
    F32,
    Bf16,
    F16,
}

impl FileDtype {
    /// HF's `torch_dtype` (config.json) to the file's type; f32 for anything else.
    pub fn from_torch(torch_dtype: Option<&str>) -> FileDtype {
        match torch_dtype {
            Some("bfloat16") => FileDtype::Bf16,
            Some("float16") => FileDtype::F16,
            _ => FileDtype::F32,
        }
    }

    fn name(self) -> &'static str {
        match self {
            FileDtype::F32 => "F32",
            FileDtype::Bf16 => "BF16",
            FileDtype::F16 => "F16",
        }
    }

    fn size(self) -> usize {
        match self {
            FileDtype::F32 => 4,
            FileDtype::Bf16 | FileDtype::F16 => 2,
        }
    }

    fn encode(self, data: &[f32], out: &mut Vec<u8>) {
        out.clear();
        match self {
            FileDtype::F32 => out.extend(data.iter().flat_map(|v| v.to_le_bytes())),
            FileDtype::Bf16 => out.extend(data.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())),
            FileDtype::F16 => out.extend(data.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes())),
        }
    }
}

/// Writes `entries` (name, shape), in that order, to `path` as `dtype`. `tensor(i)` makes
/// entry i's values (row-major f32) when its turn comes. A producer error stops the write
/// and is returned as is; an I/O error, or values that do not fill their shape, goes through
/// `io_error`. The file is fsynced; callers write to a staging path and rename.
pub fn write_safetensors<E>(
    path: &Path,
    entries: &[(String, Vec<usize>)],
    dtype: FileDtype,
    mut tensor: impl FnMut(usize) -> Result<Vec<f32>, E>,
    io_error: impl Fn(std::io::Error) -> E,
) -> Result<(), E> {
    let header = header(entries, dtype);
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(path).map_err(&io_error)?);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .and_then(|()| w.write_all(&header))
        .map_err(&io_error)?;
    let mut bytes = Vec::new();
    for (i, (name, shape)) in entries.iter().enumerate() {
        let data = tensor(i)?;
        let want: usize = shape.iter().product();
        if data.len() != want {
            return Err(io_error(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("tensor {name}: {} values for shape {shape:?}", data.len()),
            )));
        }
        dtype.encode(&data, &mut bytes);
        w.write_all(&bytes).map_err(&io_error)?;
    }
    let file = w.into_inner().map_err(|e| io_error(e.into_error()))?;
    file.sync_all().map_err(io_error)
}

/// The JSON header, entries in order with contiguous offsets, padded with spaces to 8 bytes
/// (as the safetensors writers do, so the data is aligned).
fn header(entries: &[(String, Vec<usize>)], dtype: FileDtype) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, shape) in entries {
        let bytes = shape.iter().product::<usize>() * dtype.size();
        map.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&map).expect("JSON values serialize");
    header.resize(header.len().next_multiple_of(8), b' ');
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<(String, Vec<usize>)> {
        vec![
            ("model.embed_tokens.weight".into(), vec![3, 2]),
            ("model.norm.weight".into(), vec![2]),
            ("lm_head.weight".into(), vec![1, 2]),
        ]
    }

    fn values(i: usize) -> Vec<f32> {
        let n: usize = entries()[i].1.iter().product();
        (0..n).map(|j| (i * 10 + j) as f32 + 0.5).collect()
    }

    /// The safetensors crate (what transformers' loader mirrors) reads back every tensor with
    /// its dtype, shape and values.
    #[test]
    fn the_safetensors_crate_reads_what_is_streamed() {
        for (dtype, st) in [
            (FileDtype::F32, safetensors::Dtype::F32),
            (FileDtype::Bf16, safetensors::Dtype::BF16),
            (FileDtype::F16, safetensors::Dtype::F16),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("model.safetensors");
            write_safetensors(
                &path,
                &entries(),
                dtype,
                |i| Ok::<_, std::io::Error>(values(i)),
                |e| e,
            )
            .unwrap();
            let bytes = std::fs::read(&path).unwrap();
            let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            assert_eq!(file.len(), 3);
            for (i, (name, shape)) in entries().iter().enumerate() {
                let t = file.tensor(name).unwrap();
                assert_eq!((t.dtype(), t.shape()), (st, shape.as_slice()), "{name}");
                let got: Vec<f32> = match dtype {
                    FileDtype::F32 => t
                        .data()
                        .chunks(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect(),
                    FileDtype::Bf16 => t
                        .data()
                        .chunks(2)
                        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect(),
                    FileDtype::F16 => t
                        .data()
                        .chunks(2)
                        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect(),
                };
                // x.5 for small x is exact in all three types.
                assert_eq!(got, values(i), "{name} {dtype:?}");
            }
        }
    }

    /// A producer's error and a tensor of the wrong size both stop the write with an error
    /// naming what went wrong.
    #[test]
    fn a_failing_or_wrong_sized_tensor_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let failing = write_safetensors(
            &path,
            &entries(),
            FileDtype::F32,
            |i| {
                if i == 1 {
                    Err(format!("cannot read {}", entries()[i].0))
                } else {
                    Ok(values(i))
                }
            },
            |e| e.to_string(),
        );
        assert_eq!(failing.unwrap_err(), "cannot read model.norm.weight");
        let short = write_safetensors(
            &path,
            &entries(),
            FileDtype::Bf16,
            |i| Ok(values(i)[1..].to_vec()),
            |e| e.to_string(),
        );
        assert_eq!(
            short.unwrap_err(),
            "tensor model.embed_tokens.weight: 5 values for shape [3, 2]"
        );
    }
}
