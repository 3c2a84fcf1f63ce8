//! GGUF files (v2 and v3, little-endian), memory-mapped: the header (metadata key/values of
//! every type, arrays included, and tensor infos) is parsed and checked up front; tensor data
//! is read on demand.
//!
//! Layout (ggml/docs/gguf.md): magic "GGUF", u32 version, u64 tensor count, u64 metadata count,
//! the metadata, the tensor infos, padding to `general.alignment` (default 32), tensor data.
//! Tensor offsets are relative to the start of the data and aligned too.
//!
//! The file is untrusted: every count in the header is checked against the bytes left in the
//! file before it sizes anything, and what the header parses into (keys, values, strings, tensor
//! infos) is charged against [`MAX_HEADER_MEMORY`] as it is read, so a small file cannot ask for
//! more (an array of a billion one-byte items takes 32 GB as [`Value`]s).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::dequant;
use crate::error::{GgufError, Result};
use crate::ggml::GgmlType;

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Memory the parsed header may take (a 256k-token vocabulary with its merges takes ~30 MB).
pub const MAX_HEADER_MEMORY: u64 = 1 << 30;
/// Tensor infos a header may declare (released models have a few thousand).
pub const MAX_TENSORS: u64 = 1 << 20;

/// A metadata value; the type codes are GGUF's.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Item type code and items (all of that type, as GGUF requires).
    Array(u32, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

pub mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

impl Value {
    pub fn type_code(&self) -> u32 {
        use value_type as t;
        match self {
            Value::U8(_) => t::U8,
            Value::I8(_) => t::I8,
            Value::U16(_) => t::U16,
            Value::I16(_) => t::I16,
            Value::U32(_) => t::U32,
            Value::I32(_) => t::I32,
            Value::F32(_) => t::F32,
            Value::Bool(_) => t::BOOL,
            Value::String(_) => t::STRING,
            Value::Array(..) => t::ARRAY,
            Value::U64(_) => t::U64,
            Value::I64(_) => t::I64,
            Value::F64(_) => t::F64,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(..) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }

    /// Any integer type that holds a non-negative value (writers differ: u32, i32, u64).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, items) => Some(items),
            _ => None,
        }
    }
}

/// One tensor's header entry.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the fastest-varying (row length).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Bytes from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Row-major shape as safetensors and PyTorch write it (ggml dims reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    pub fn n_bytes(&self) -> Option<u64> {
        self.ty.bytes_for(self.n_elements())
    }
}

/// An open GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    metadata: Vec<(String, Value)>,
    index: HashMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    data_start: u64,
    pub alignment: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Reads little-endian values from the header, naming the byte offset when it runs out.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// What is left of [`MAX_HEADER_MEMORY`].
    memory_left: u64,
}

impl<'a> Cursor<'a> {
    fn corrupt(&self, msg: impl Into<String>) -> GgufError {
        GgufError::Corrupt {
            path: self.path.to_path_buf(),
            offset: self.pos as u64,
            msg: msg.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| self.corrupt(format!("needs {n} more bytes, the file ends first")))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count that must fit what is left of the file at `min_item` bytes per item, so a corrupt
    /// count fails here instead of allocating terabytes.
    fn count(&mut self, min_item: usize, what: &str) -> Result<usize> {
        let n = self.u64()?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_item as u64) > left {
            return Err(self.corrupt(format!("{what} count {n} does not fit in the file")));
        }
        Ok(n as usize)
    }

    /// Charges `bytes` of parsed header to the memory budget; `what` names the key or tensor.
    fn charge(&mut self, bytes: u64, what: impl FnOnce(String) -> GgufError) -> Result<()> {
        self.memory_left = self.memory_left.checked_sub(bytes).ok_or_else(|| {
            what(format!(
                "the header would take over {MAX_HEADER_MEMORY} bytes of memory, the limit for a GGUF header"
            ))
        })?;
        Ok(())
    }

    /// A string, charged to the budget before it is copied; `key` names it in errors.
    fn string(&mut self, key: &str) -> Result<String> {
        let len = self.count(1, "string length")?;
        let path = self.path;
        self.charge(len as u64, |msg| GgufError::metadata(path, key, msg))?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.corrupt("string is not UTF-8"))
    }

    fn value(&mut self, key: &str, ty: u32, depth: usize) -> Result<Value> {
        use value_type as t;
        Ok(match ty {
            t::U8 => Value::U8(self.array::<1>()?[0]),
            t::I8 => Value::I8(i8::from_le_bytes(self.array()?)),
            t::U16 => Value::U16(u16::from_le_bytes(self.array()?)),
            t::I16 => Value::I16(i16::from_le_bytes(self.array()?)),
            t::U32 => Value::U32(self.u32()?),
            t::I32 => Value::I32(i32::from_le_bytes(self.array()?)),
            t::F32 => Value::F32(f32::from_le_bytes(self.array()?)),
            t::BOOL => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.corrupt(format!("bool byte {b} is neither 0 nor 1"))),
            },
            t::STRING => Value::String(self.string(key)?),
            t::ARRAY => {
                if depth > 0 {
                    // gguf-py and llama.cpp never write nested arrays; refusing them bounds recursion.
                    return Err(self.corrupt("nested arrays are not supported"));
                }
                let item = self.u32()?;
                let n = self.count(min_encoded_size(item), "array")?;
                let path = self.path;
                self.charge(n as u64 * size_of::<Value>() as u64, |msg| {
                    GgufError::metadata(path, key, format!("an array of {n} items: {msg}"))
                })?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(key, item, depth + 1)?);
                }
                Value::Array(item, items)
            }
            t::U64 => Value::U64(self.u64()?),
            t::I64 => Value::I64(i64::from_le_bytes(self.array()?)),
            t::F64 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(self.corrupt(format!("unknown metadata value type {other}"))),
        })
    }
}

/// The fewest bytes a value of type `ty` takes in the file (a string: its length).
fn min_encoded_size(ty: u32) -> usize {
    use value_type as t;
    match ty {
        t::U8 | t::I8 | t::BOOL => 1,
        t::U16 | t::I16 => 2,
        t::U32 | t::I32 | t::F32 => 4,
        // Strings and arrays start with a u64 length; an array also has its item type.
        t::STRING | t::U64 | t::I64 | t::F64 => 8,
        t::ARRAY => 12,
        // Unknown types fail at the first item.
        _ => 1,
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| GgufError::io(path, e))?;
        // SAFETY: read-only map; a file rewritten underneath a reader is outside what any
        // loader can defend against (llama.cpp maps GGUF files the same way).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| GgufError::io(path, e))?;
        Self::parse(path, mmap)
    }

    fn parse(path: &Path, mmap: Mmap) -> Result<Self> {
        let mut c = Cursor {
            bytes: &mmap,
            pos: 0,
            path,
            memory_left: MAX_HEADER_MEMORY,
        };
        let magic = c.array::<4>().map_err(|_| GgufError::NotGguf {
            path: path.to_path_buf(),
            magic: String::from_utf8_lossy(&mmap[..mmap.len().min(4)]).into_owned(),
        })?;
        if &magic != MAGIC {
            return Err(GgufError::NotGguf {
                path: path.to_path_buf(),
                magic: String::from_utf8_lossy(&magic).into_owned(),
            });
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            // A big-endian file reads its version byte-swapped (e.g. 0x03000000).
            return Err(GgufError::Version {
                path: path.to_path_buf(),
                version,
            });
        }
        // A tensor info takes at least 8 (name length) + 4 + 4 + 8 bytes.
        let n_tensors = c.count(24, "tensor")?;
        if n_tensors as u64 > MAX_TENSORS {
            return Err(GgufError::invalid(
                path,
                format!("the header declares {n_tensors} tensors, over the limit of {MAX_TENSORS}"),
            ));
        }
        let n_kv = c.count(12, "metadata")?;
        // Each entry is held twice: in `metadata` and as `index`'s key.
        let entry = (size_of::<(String, Value)>() + size_of::<(String, usize)>()) as u64;
        c.charge(n_kv as u64 * entry, |msg| {
            GgufError::invalid(path, format!("{n_kv} metadata entries: {msg}"))
        })?;
        let mut metadata = Vec::with_capacity(n_kv);
        let mut index = HashMap::new();
        for _ in 0..n_kv {
            let key = c.string("<key>")?;
            // Its copy in `index`.
            c.charge(key.len() as u64, |msg| GgufError::metadata(path, &key, msg))?;
            let ty = c.u32()?;
            let value = c.value(&key, ty, 0)?;
            if index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::metadata(path, key, "appears twice"));
            }
            metadata.push((key, value));
        }
        // A tensor info, its dims, and `tensor_index`'s entry.
        let info = (size_of::<TensorInfo>() + 4 * size_of::<u64>() + size_of::<(String, usize)>()) as u64;
        c.charge(n_tensors as u64 * info, |msg| {
            GgufError::invalid(path, format!("{n_tensors} tensor infos: {msg}"))
        })?;
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("<tensor name>")?;
            // Its copy in `tensor_index`.
            c.charge(name.len() as u64, |msg| GgufError::tensor(path, &name, msg))?;
            let n_dims = c.u32()?;
            if n_dims == 0 || n_dims > 4 {
                return Err(GgufError::tensor(
                    path,
                    name,
                    format!("{n_dims} dimensions (ggml allows 1 to 4)"),
                ));
            }
            let dims = (0..n_dims).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
            let ty_id = c.u32()?;
            let offset = c.u64()?;
            let ty = GgmlType::from_id(ty_id)
                .ok_or_else(|| GgufError::tensor(path, &name, format!("unknown ggml type id {ty_id}")))?;
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
            });
        }
        let alignment = match index.get(ALIGNMENT_KEY).map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| GgufError::metadata(path, ALIGNMENT_KEY, "must be a power of two"))?,
        };
        let data_start = (c.pos as u64).next_multiple_of(alignment);
        let mut file = GgufFile {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            index,
            tensors,
            tensor_index: HashMap::new(),
            data_start,
            alignment,
        };
        file.check_tensors()?;
        Ok(file)
    }

    /// Names unique, extents whole blocks, aligned and inside the file.
    fn check_tensors(&mut self) -> Result<()> {
        let len = self.mmap.len() as u64;
        for (i, t) in self.tensors.iter().enumerate() {
            let bad = |msg: String| GgufError::tensor(&self.path, &t.name, msg);
            if self.tensor_index.insert(t.name.clone(), i).is_some() {
                return Err(bad("appears twice".into()));
            }
            // n_elements() multiplies the dims; every later use of them relies on this check.
            if t.dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d)).is_none() {
                return Err(bad(format!("dims {:?} overflow 64 bits", t.dims)));
            }
            let n_bytes = t.n_bytes().ok_or_else(|| {
                bad(format!(
                    "{} elements (dims {:?}) are not whole {} blocks of {}",
                    t.n_elements(),
                    t.dims,
                    t.ty.name(),
                    t.ty.block_size()
                ))
            })?;
            if !t.offset.is_multiple_of(self.alignment) {
                return Err(bad(format!(
                    "offset {} is not {}-byte aligned",
                    t.offset, self.alignment
                )));
            }
            let end = self
                .data_start
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(n_bytes));
            if end.is_none_or(|e| e > len) {
                return Err(bad(format!(
                    "data ({n_bytes} bytes at offset {}) runs past the end of the file ({len} bytes); the file is truncated",
                    t.offset
                )));
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn typed<'v, T>(
        &'v self,
        key: &str,
        want: &str,
        read: impl Fn(&'v Value) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => read(v).map(Some).ok_or_else(|| {
                GgufError::metadata(
                    &self.path,
                    key,
                    format!("expected {want}, found {}", v.type_name()),
                )
            }),
        }
    }

    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "a non-negative integer", Value::as_u64)
    }

    pub fn get_i64(&self, key: &str) -> Result<Option<i64>> {
        self.typed(key, "an integer", Value::as_i64)
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number", Value::as_f64)
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", Value::as_bool)
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", Value::as_str)
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&[Value]>> {
        self.typed(key, "an array", Value::as_array)
    }

    /// A key the conversion cannot do without.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.get_u64(key)?
            .ok_or_else(|| GgufError::metadata(&self.path, key, "missing"))
    }

    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.get_str(key)?
            .ok_or_else(|| GgufError::metadata(&self.path, key, "missing"))
    }

    /// An array of strings, e.g. `tokenizer.ggml.tokens`.
    pub fn get_strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(items) = self.get_array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| {
                v.as_str().ok_or_else(|| {
                    GgufError::metadata(
                        &self.path,
                        key,
                        format!("expected strings, found {}", v.type_name()),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor (extents were checked at open).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.data_start + info.offset) as usize;
        let len = info.n_bytes().expect("checked at open") as usize;
        &self.mmap[start..start + len]
    }

    /// A tensor dequantized to f32, row-major.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self
            .tensor(name)
            .ok_or_else(|| GgufError::tensor(&self.path, name, "not in this file"))?;
        // Refused before the output is sized: the densest types hold 20 elements per byte.
        if !info.ty.can_dequantize() {
            return Err(GgufError::tensor(
                &self.path,
                name,
                format!("ggml type {} cannot be dequantized here", info.ty.name()),
            ));
        }
        let mut out = vec![0.0; info.n_elements() as usize];
        dequant::dequantize(info.ty, self.tensor_bytes(info), &mut out)
            .map_err(|msg| GgufError::tensor(&self.path, name, msg))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::fixtures;

    fn fixture() -> GgufFile {
        GgufFile::open(&fixtures().join("gguf/metadata.gguf")).unwrap()
    }

    /// Python's view of a value (gguf-py's `field.contents()`), for comparison with ours.
    fn to_json(v: &Value) -> serde_json::Value {
        use serde_json::json;
        match v {
            Value::String(s) => json!(s),
            Value::Bool(b) => json!(b),
            Value::F32(f) => json!(f64::from(*f)),
            Value::F64(f) => json!(f),
            Value::Array(_, items) => items.iter().map(to_json).collect(),
            Value::U64(u) => json!(u),
            other => json!(other.as_i64().unwrap()),
        }
    }

    #[test]
    fn reads_every_value_type_as_gguf_py_does() {
        let file = fixture();
        let expected: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixtures().join("gguf/metadata.json")).unwrap()).unwrap();
        let fields = expected["fields"].as_object().unwrap();
        assert!(fields.len() >= 17);
        for (key, want) in fields {
            let got = file.get(key).unwrap_or_else(|| panic!("{key} missing"));
            assert_eq!(to_json(got), want["value"], "{key}");
            let type_name = want["types"][0].as_str().unwrap().to_lowercase();
            let ours = match got.type_name() {
                "u8" => "uint8",
                "i8" => "int8",
                "u16" => "uint16",
                "i16" => "int16",
                "u32" => "uint32",
                "i32" => "int32",
                "u64" => "uint64",
                "i64" => "int64",
                "f32" => "float32",
                "f64" => "float64",
                other => other,
            };
            assert_eq!(ours, type_name, "{key}");
        }
        assert_eq!(file.alignment, 64);
        assert_eq!(file.version, 3);
    }

    #[test]
    fn reads_tensors_at_their_aligned_offsets() {
        let file = fixture();
        let expected: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixtures().join("gguf/metadata.json")).unwrap()).unwrap();
        let tensors = expected["tensors"].as_object().unwrap();
        assert_eq!(file.tensors.len(), tensors.len());
        for (name, want) in tensors {
            let info = file.tensor(name).unwrap();
            assert_eq!(info.ty.name(), want["type"].as_str().unwrap());
            let dims: Vec<u64> = serde_json::from_value(want["ggml_dims"].clone()).unwrap();
            assert_eq!(info.dims, dims, "{name}");
            let values: Vec<f64> = serde_json::from_value(want["values"].clone()).unwrap();
            let got: Vec<f64> = file.read_f32(name).unwrap().into_iter().map(f64::from).collect();
            assert_eq!(got, values, "{name}");
        }
        assert_eq!(file.tensor("a.weight").unwrap().shape(), vec![2, 3]);
    }

    #[test]
    fn truncated_and_foreign_files_are_named_errors() {
        let bytes = std::fs::read(fixtures().join("gguf/metadata.gguf")).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("cut.gguf");
        // len - 80 cuts into the last tensor's data (the file ends in alignment padding).
        for cut in [bytes.len() - 80, 300, 20, 2] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let err = GgufFile::open(&path).unwrap_err().to_string();
            assert!(err.contains("cut.gguf"), "{err}");
            assert!(
                err.contains("truncated") || err.contains("not a GGUF"),
                "cut at {cut}: {err}"
            );
        }
        std::fs::write(&path, b"{\"not\": \"gguf\"}").unwrap();
        let err = GgufFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("not a GGUF file"), "{err}");
        let mut v1 = bytes.clone();
        v1[4..8].copy_from_slice(&1u32.to_le_bytes());
        std::fs::write(&path, &v1).unwrap();
        let err = GgufFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("GGUF version 1 is not supported"), "{err}");
    }

    #[test]
    fn typed_getters_name_the_key_on_a_type_mismatch() {
        let file = fixture();
        assert_eq!(file.get_u64("t.u32").unwrap(), Some(4_000_000_000));
        let err = file.get_u64("t.i8").unwrap_err().to_string();
        assert!(
            err.contains("metadata `t.i8`: expected a non-negative integer, found i8"),
            "{err}"
        );
        let err = file.require_str("t.u8").unwrap_err().to_string();
        assert!(
            err.contains("metadata `t.u8`: expected a string, found u8"),
            "{err}"
        );
        let err = file.require_u64("nope").unwrap_err().to_string();
        assert!(err.contains("metadata `nope`: missing"), "{err}");
    }

    /// A GGUF v3 header by hand: `n_tensors`, `n_kv`, then `body` (entries as the file holds
    /// them); `pad` zero bytes follow, sparse, so that counts checked against the file's size
    /// pass without a large write.
    fn hostile(name: &str, n_tensors: u64, n_kv: u64, body: &[u8], pad: u64) -> (tempfile::TempDir, PathBuf) {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&n_tensors.to_le_bytes());
        bytes.extend_from_slice(&n_kv.to_le_bytes());
        bytes.extend_from_slice(body);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(bytes.len() as u64 + pad).unwrap();
        (tmp, path)
    }

    fn gguf_string(s: &str) -> Vec<u8> {
        let mut out = (s.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(s.as_bytes());
        out
    }

    /// A metadata entry `key` holding an array of `n` items of type `item`.
    fn array_entry(key: &str, item: u32, n: u64) -> Vec<u8> {
        let mut out = gguf_string(key);
        out.extend_from_slice(&value_type::ARRAY.to_le_bytes());
        out.extend_from_slice(&item.to_le_bytes());
        out.extend_from_slice(&n.to_le_bytes());
        out
    }

    fn open_err(path: &Path) -> String {
        GgufFile::open(path).unwrap_err().to_string()
    }

    #[test]
    fn an_array_that_fits_the_file_but_not_the_memory_budget_is_refused() {
        // 40M one-byte items would be 40M 32-byte Values: 1.3 GB from a 40 MB file.
        let n = 40_000_000;
        let (_tmp, path) = hostile("big.gguf", 0, 1, &array_entry("big", value_type::U8, n), n);
        let err = open_err(&path);
        assert!(
            err.contains("big.gguf: metadata `big`: an array of 40000000 items: the header would take over 1073741824 bytes of memory"),
            "{err}"
        );
    }

    #[test]
    fn counts_and_lengths_past_the_end_of_the_file_are_refused_before_allocating() {
        let mut long_key = u64::MAX.to_le_bytes().to_vec();
        long_key.extend_from_slice(b"k");
        for (body, want) in [
            (
                array_entry("a", value_type::U8, u64::MAX),
                "array count 18446744073709551615 does not fit",
            ),
            // Strings take at least their 8-byte length each.
            (
                array_entry("s", value_type::STRING, 100),
                "array count 100 does not fit",
            ),
            (long_key, "string length count 18446744073709551615 does not fit"),
        ] {
            let (_tmp, path) = hostile("c.gguf", 0, 1, &body, 100);
            let err = open_err(&path);
            assert!(
                err.contains("c.gguf: corrupt GGUF header") && err.contains(want),
                "{err}"
            );
        }
    }

    #[test]
    fn nested_arrays_are_refused() {
        let mut body = array_entry("outer", value_type::ARRAY, 1);
        body.extend_from_slice(&value_type::U8.to_le_bytes());
        body.extend_from_slice(&1u64.to_le_bytes());
        let (_tmp, path) = hostile("n.gguf", 0, 1, &body, 16);
        assert!(open_err(&path).contains("nested arrays are not supported"));
    }

    #[test]
    fn too_many_tensors_are_refused_before_their_infos_are_read() {
        let n = MAX_TENSORS + 1;
        let (_tmp, path) = hostile("t.gguf", n, 0, &[], 24 * n);
        let err = open_err(&path);
        assert!(
            err.ends_with("t.gguf: the header declares 1048577 tensors, over the limit of 1048576"),
            "{err}"
        );
    }

    /// A tensor info: name, dims, type, offset.
    fn tensor_entry(name: &str, dims: &[u64], ty: GgmlType, offset: u64) -> Vec<u8> {
        let mut out = gguf_string(name);
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&ty.id().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out
    }

    #[test]
    fn tensor_extents_that_overflow_or_leave_the_file_are_refused() {
        for (dims, offset, want) in [
            (
                vec![1u64 << 32, 1 << 32, 1 << 32],
                0,
                "dims [4294967296, 4294967296, 4294967296] overflow 64 bits",
            ),
            (vec![1 << 40], 0, "runs past the end of the file"),
            (vec![8], u64::MAX - 31, "runs past the end of the file"),
        ] {
            let body = tensor_entry("w", &dims, GgmlType::F32, offset);
            let (_tmp, path) = hostile("x.gguf", 1, 0, &body, 64);
            let err = open_err(&path);
            assert!(
                err.contains("x.gguf: tensor `w`: ") && err.contains(want),
                "{dims:?}: {err}"
            );
        }
    }
}
