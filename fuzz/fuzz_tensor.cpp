// libFuzzer target for the tensor API: the input is a program of calls (tensor_program.hpp).
// Every call must give a value or a loom::Error: a crash, a hang, another exception, a leak or
// a sanitizer report (ASan, UBSan) is a finding.
#include "tensor_program.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    loom_fuzz::TensorProgram({data, size}).run();
    return 0;
}
