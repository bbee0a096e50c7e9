//! What fedtune reads from peers and from files, kept free of burn so that it can be fuzzed
//! (`fuzz/`) with sanitizers in minutes: named tensors, the chunk codec (the assembler checks
//! every chunk before it is kept) and its compressed encodings, safetensors checkpoints with checksums, pre-trained weight
//! files (safetensors, PyTorch `.pt`), and IDX / CSV / image-folder data.
//! `fedtune-common` re-exports each module under the same name.

pub mod blocks;
pub mod checkpoint;
pub mod codec;
pub mod data;
pub mod pretrained;
pub mod tensors;
pub mod wire;
