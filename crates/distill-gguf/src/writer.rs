//! GGUF v3 writer: metadata, tensor infos with offsets computed up front, then each tensor's
//! bytes as the caller produces them (so a model is quantized one tensor at a time).

use std::io::{BufWriter, Write};
use std::path::Path;

use crate::error::{GgufError, Result};
use crate::ggml::GgmlType;
use crate::reader::{DEFAULT_ALIGNMENT, MAGIC, Value};

/// A tensor to write: ggml dims (row length first) and type.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorSpec {
    fn n_bytes(&self) -> u64 {
        let n: u64 = self.dims.iter().product();
        self.ty
            .bytes_for(n)
            .expect("tensor specs are checked for whole blocks")
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::Array(item, items) => {
            out.extend_from_slice(&item.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

/// Writes `path`; `data(i)` returns tensor i's bytes, exactly `tensors[i]`'s size.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorSpec],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let align = DEFAULT_ALIGNMENT;
    let mut head = Vec::new();
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_str(&mut head, key);
        head.extend_from_slice(&value.type_code().to_le_bytes());
        put_value(&mut head, value);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut head, &t.name);
        head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            head.extend_from_slice(&d.to_le_bytes());
        }
        head.extend_from_slice(&t.ty.id().to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + t.n_bytes()).next_multiple_of(align);
    }
    head.resize((head.len() as u64).next_multiple_of(align) as usize, 0);

    let io = |e| GgufError::io(path, e);
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(path).map_err(io)?);
    w.write_all(&head).map_err(io)?;
    for (i, t) in tensors.iter().enumerate() {
        let bytes = data(i)?;
        assert_eq!(
            bytes.len() as u64,
            t.n_bytes(),
            "tensor {} produced the wrong size",
            t.name
        );
        w.write_all(&bytes).map_err(io)?;
        let pad = (bytes.len() as u64).next_multiple_of(align) - bytes.len() as u64;
        w.write_all(&vec![0; pad as usize]).map_err(io)?;
    }
    w.into_inner()
        .map_err(|e| io(e.into_error()))?
        .sync_all()
        .map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reader::{GgufFile, value_type};
    use crate::test_util::fixtures;

    /// Re-writing the gguf-py fixture's metadata and tensors reads back identically.
    #[test]
    fn what_we_write_reads_back() {
        let src = GgufFile::open(&fixtures().join("gguf/metadata.gguf")).unwrap();
        let metadata: Vec<(String, Value)> = src
            .metadata()
            .iter()
            .filter(|(k, _)| k != "general.alignment")
            .cloned()
            .chain([("t.nested_empty".to_string(), Value::Array(value_type::U8, vec![]))])
            .collect();
        let specs: Vec<TensorSpec> = src
            .tensors
            .iter()
            .map(|t| TensorSpec {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ty: t.ty,
            })
            .collect();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("out.gguf");
        write_gguf(&path, &metadata, &specs, |i| {
            Ok(src.tensor_bytes(&src.tensors[i]).to_vec())
        })
        .unwrap();
        let back = GgufFile::open(&path).unwrap();
        assert_eq!(back.metadata(), &metadata[..]);
        assert_eq!(back.tensors.len(), specs.len());
        for t in &src.tensors {
            assert_eq!(back.tensor(&t.name).unwrap().dims, t.dims);
            assert_eq!(back.read_f32(&t.name).unwrap(), src.read_f32(&t.name).unwrap());
        }
    }
}
