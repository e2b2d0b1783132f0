/// \file
/// safetensors files: an 8-byte little-endian header length, a JSON header naming each tensor's
/// dtype, shape and byte range, then the raw data. Supported dtypes: F32, F64, I64, BOOL.
#pragma once
#include <cstddef>
#include <map>
#include <span>
#include <string>

#include "../core/tensor.hpp"

/// In namespace loom, not loom::nn: save and load serve any tensors (checkpoints, data), as
/// torch::save does; the file sits in nn/ because modules are its main users.
namespace loom {

/// A safetensors file's string metadata.
using Metadata = std::map<std::string, std::string>;

/// A safetensors file read whole.
struct SafetensorsContents {
    /// Its tensors by name.
    NamedTensorMap tensors;
    /// Its metadata.
    Metadata metadata;
};

/// Writes atomically: a temporary file in the same folder, flushed and synced, then renamed over
/// `path`. A failure part-way leaves any previous file at `path` untouched.
void save(const std::string& path, const NamedTensorMap& tensors, const Metadata& metadata = {});
/// Reads every tensor, or throws loom::Error naming the file and what is wrong with it;
/// nothing is returned partially.
NamedTensorMap load(const std::string& path);
/// Reads every tensor and the metadata, as load().
SafetensorsContents load_with_metadata(const std::string& path);
/// Parses safetensors bytes held in memory; `source` names them in errors.
SafetensorsContents parse_safetensors(std::span<const std::byte> bytes, const std::string& source);

}  // namespace loom
