// libFuzzer target for second derivatives: the input is a program of smooth ops
// (second_order_program.hpp) whose Hessian-vector product must equal the finite differences of
// its gradient. A mismatch aborts with the program; so does any crash or sanitizer report.
#include "second_order_program.hpp"

#include <cstdio>
#include <cstdlib>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    if (const auto mismatch = loom_fuzz::SecondOrderProgram({data, size}).run()) {
        std::fprintf(stderr, "second derivative mismatch: %s\n", mismatch->c_str());
        std::abort();
    }
    return 0;
}
