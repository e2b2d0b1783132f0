// TensorBoard event files, read back independently (event_reader.hpp): the TFRecord frames with a
// CRC-32C computed bit by bit, and every record decoded by protoc with the Event schema in tests/data.
#include "event_reader.hpp"
#include "helpers.hpp"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <regex>

using namespace loom;
using testing::check_error;
using testing::TempDir;
namespace fs = std::filesystem;

namespace {

using event_reader::crc32c_bitwise;

std::vector<std::string> records(const std::string& path)
{
    std::vector<std::string> out;
    REQUIRE_NOTHROW(out = event_reader::records(path));
    return out;
}

std::string decode(const std::string& record, const TempDir& dir)
{
    std::string text;
    REQUIRE_NOTHROW(text = event_reader::decode(record, LOOM_TEST_DATA, dir.path.string()));
    return text;
}

std::string event_file(const std::string& dir)
{
    std::vector<std::string> files;
    for (const auto& e : fs::directory_iterator(dir))
        if (e.is_regular_file() && e.path().filename().string().rfind("events.out.tfevents.", 0) == 0)
            files.push_back(e.path().string());
    REQUIRE(files.size() == 1);
    return files[0];
}

double field(const std::string& text, const std::string& name)
{
    std::smatch m;
    REQUIRE_MESSAGE(std::regex_search(text, m, std::regex(name + ": (-?[0-9.e+-]+)")), name, " not in ", text);
    return std::stod(m[1]);
}

}  // namespace

TEST_CASE("crc32c: the check value of the CRC-32C catalogue")
{
    CHECK(train::crc32c("123456789", 9) == 0xe3069283u);
    CHECK(crc32c_bitwise("123456789") == 0xe3069283u);
}

TEST_CASE("SummaryWriter: scalars, histograms and text, every frame and value read back by protoc")
{
    TempDir dir;
    const std::string log_dir = dir.file("run");
    {
        train::SummaryWriter w(log_dir);
        w.add_scalar("loss", 0.5, 1);
        w.add_scalar("loss", 0.25, 2);
        w.add_histogram("weights", tensor({1, 2, 2, 3, 3, 3}), 7, 3);
        w.add_text("note", "hello *world*", 3);
        w.add_scalars("curves", {{"a", 1.5}, {"b", -2}}, 4);
    }
    const auto recs = records(event_file(log_dir));
    REQUIRE(recs.size() == 5);
    const std::string version = decode(recs[0], dir);
    CHECK(version.find("file_version: \"brain.Event:2\"") != std::string::npos);
    CHECK(field(version, "wall_time") > 1.7e9);

    const std::string s1 = decode(recs[1], dir), s2 = decode(recs[2], dir);
    CHECK(s1.find("tag: \"loss\"") != std::string::npos);
    CHECK(field(s1, "step") == 1);
    CHECK(field(s1, "simple_value") == 0.5);
    CHECK(field(s2, "step") == 2);
    CHECK(field(s2, "simple_value") == 0.25);

    const std::string h = decode(recs[3], dir);
    CHECK(h.find("tag: \"weights\"") != std::string::npos);
    CHECK(field(h, "step") == 7);
    CHECK(field(h, "min") == 1);
    CHECK(field(h, "max") == 3);
    CHECK(field(h, "num") == 6);
    CHECK(field(h, "sum") == 14);
    CHECK(field(h, "sum_squares") == 36);
    // Three equal buckets over [1, 3]: upper edges 1.667, 2.333, 3 with counts 1, 2, 3.
    std::vector<double> limits, counts;
    const std::regex limit_line("bucket_limit: ([0-9.e+-]+)"), count_line("\\bbucket: ([0-9.e+-]+)");
    for (std::sregex_iterator it(h.begin(), h.end(), limit_line), end; it != end; ++it)
        limits.push_back(std::stod((*it)[1]));
    for (std::sregex_iterator it(h.begin(), h.end(), count_line), end; it != end; ++it)
        counts.push_back(std::stod((*it)[1]));
    REQUIRE(limits.size() == 3);
    CHECK(limits[0] == doctest::Approx(5.0 / 3));
    CHECK(limits[1] == doctest::Approx(7.0 / 3));
    CHECK(limits[2] == 3);
    CHECK(counts == std::vector<double>{1, 2, 3});

    const std::string t = decode(recs[4], dir);
    CHECK(t.find("tag: \"note\"") != std::string::npos);
    CHECK(t.find("plugin_name: \"text\"") != std::string::npos);
    CHECK(t.find("string_val: \"hello *world*\"") != std::string::npos);
    CHECK(field(t, "dtype") == 7);
    CHECK(field(t, "size") == 1);

    // add_scalars: one folder per curve, the main tag as the tag, as PyTorch's.
    for (const auto& [key, value] : std::vector<std::pair<std::string, double>>{{"a", 1.5}, {"b", -2}}) {
        const auto sub = records(event_file(log_dir + "/curves_" + key));
        REQUIRE(sub.size() == 2);
        const std::string text = decode(sub[1], dir);
        CHECK(text.find("tag: \"curves\"") != std::string::npos);
        CHECK(field(text, "simple_value") == value);
        CHECK(field(text, "step") == 4);
    }
}

TEST_CASE("SummaryWriter refuses what it cannot write, naming it")
{
    TempDir dir;
    train::SummaryWriter w(dir.file("run"));
    check_error([&] { w.add_histogram("w", tensor({1.0, std::nan("")}), 0); }, {"add_histogram", "'w'", "nan", "index 1"});
    check_error([&] { w.add_histogram("w", tensor({1.0}), 0, 0); }, {"add_histogram", "bins > 0"});
    check_error([&] { w.add_scalar("", 1, 0); }, {"add_scalar", "non-empty tag"});
    std::ofstream(dir.file("file")) << "x";
    check_error([&] { train::SummaryWriter bad(dir.file("file")); }, {"SummaryWriter", "cannot create"});
}

TEST_CASE("TensorBoardLogger in fit: step losses, epoch metrics, the summary, histograms and norms every n steps")
{
    TempDir dir;
    Generator gen(2);
    const Tensor x = randn({32, 2}, kFloat64, &gen), y = x.sum({1}, true) * 3.0;
    const train::Dataset data{32, [&](const std::vector<std::int64_t>& idx) {
                                  const Tensor i = from_vector<std::int64_t>(idx, {std::int64_t(idx.size())});
                                  return train::Batch{x.index_select(0, i), y.index_select(0, i), {}};
                              }};
    nn::Dense model(2, 1, true, kFloat64);
    optim::SGD opt(model.parameters(), optim::SGDOptions(0.05));
    train::FitOptions o;
    o.epochs = 2;
    o.batch_size = 8;  // 4 steps an epoch, 8 in all: histograms at steps 3 and 6
    o.verbose = false;
    o.callbacks = {std::make_shared<train::TensorBoardLogger>(dir.file("tb"), 3)};
    const auto history = train::fit(model, opt, [&](const train::Batch& b) { return model(b.input); },
                                    [](const Tensor& out, const train::Batch& b) { return nn::mse_loss(out, b.target); },
                                    data, data, o);
    std::string all;
    for (const auto& r : records(event_file(dir.file("tb")))) all += decode(r, dir) + "---\n";
    const auto count = [&](const std::string& needle) {
        std::size_t n = 0;
        for (std::size_t at = all.find(needle); at != std::string::npos; at = all.find(needle, at + 1)) ++n;
        return n;
    };
    CHECK(count("tag: \"batch/loss\"") == 8);
    CHECK(count("tag: \"batch/lr\"") == 8);
    CHECK(count("tag: \"epoch/train_loss\"") == 2);
    CHECK(count("tag: \"epoch/val_loss\"") == 2);
    CHECK(count("plugin_name: \"text\"") == 1);
    CHECK(count("tag: \"weights/weight\"") == 2);
    CHECK(count("tag: \"gradients/bias\"") == 2);
    CHECK(count("tag: \"grad_norm/weight\"") == 2);
    // The last epoch's validation loss, as fit returned it (simple_value is a float).
    const std::size_t at = all.rfind("tag: \"epoch/val_loss\"");
    CHECK(field(all.substr(at), "simple_value") ==
          doctest::Approx(history.epochs.back().at("val_loss")).epsilon(1e-6));
}
