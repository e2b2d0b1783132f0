// Defect class 10: files. New files get the mode the umask gives any new file; temporary files
// left by a process that died mid-save are removed by the next save of the same file.
#include "helpers.hpp"

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>

using namespace loom;
using testing::TempDir;
namespace fs = std::filesystem;

TEST_CASE("save honours the umask")
{
    TempDir dir;
    for (mode_t mask : {mode_t(022), mode_t(027), mode_t(077)}) {
        const mode_t old = ::umask(mask);
        const std::string path = dir.file(fmt::format("m{:o}.safetensors", mask));
        save(path, {{"x", ones({2})}});
        ::umask(old);
        struct stat st {};
        REQUIRE(::stat(path.c_str(), &st) == 0);
        CHECK((st.st_mode & 0777) == (0666 & ~mask));
    }
}

TEST_CASE("temporary files of dead processes are cleaned up; live ones are left alone")
{
    TempDir dir;
    const std::string path = dir.file("model.safetensors");
    const pid_t child = ::fork();
    if (child == 0) ::_exit(0);
    REQUIRE(child > 0);
    REQUIRE(::waitpid(child, nullptr, 0) == child);  // a pid that no longer runs
    const fs::path stale = dir.path / fmt::format(".model.safetensors.tmp-{}-Ab3xYz", child);
    const fs::path live = dir.path / fmt::format(".model.safetensors.tmp-{}-Qw9rTy", ::getppid());
    const fs::path other = dir.path / fmt::format(".other.safetensors.tmp-{}-Zz1aBc", child);
    for (const auto& p : {stale, live, other}) std::ofstream(p) << "partial";
    save(path, {{"x", ones({2})}});
    CHECK(!fs::exists(stale));
    CHECK(fs::exists(live));   // its writer may still be running
    CHECK(fs::exists(other));  // another file's: not ours to judge
    CHECK(load(path).at("x").numel() == 2);
    std::size_t temps = 0;
    for (const auto& e : fs::directory_iterator(dir.path)) temps += e.path().filename().string().find(".tmp-") != std::string::npos;
    CHECK(temps == 2);  // the save's own temporary file is gone
}
