// libFuzzer target for the safetensors reader: any bytes must give tensors or a loom::Error,
// never a crash, a hang, another exception or an out-of-bounds read (ASan and UBSan watch).
#include <loom/loom.hpp>

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    try {
        const auto contents = loom::parse_safetensors({reinterpret_cast<const std::byte*>(data), size}, "fuzz input");
        for (const auto& [name, t] : contents.tensors) (void)t.numel();
    } catch (const loom::Error&) {
    }
    return 0;
}
