// png_check FILE.png: decodes a screenshot (8-bit RGB or RGBA, not interlaced, as Chromium
// writes them) and fails unless it shows something: at least 3% of its pixels differ from the
// most common colour (the background), in at least 50 distinct colours. Prints what it found.
#include <zlib.h>

#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace {

[[noreturn]] void fail(const std::string& why)
{
    std::fprintf(stderr, "png_check: %s\n", why.c_str());
    std::exit(1);
}

std::uint32_t big_endian(const unsigned char* p) { return std::uint32_t(p[0]) << 24 | p[1] << 16 | p[2] << 8 | p[3]; }

int paeth(int a, int b, int c)
{
    const int p = a + b - c, pa = std::abs(p - a), pb = std::abs(p - b), pc = std::abs(p - c);
    return pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
}

}  // namespace

int main(int argc, char** argv)
{
    if (argc != 2) fail("usage: png_check FILE.png");
    std::ifstream in(argv[1], std::ios::binary);
    std::stringstream buffer;
    buffer << in.rdbuf();
    const std::string file = buffer.str();
    const auto* bytes = reinterpret_cast<const unsigned char*>(file.data());
    if (file.size() < 8 || file.compare(0, 8, "\x89PNG\r\n\x1a\n") != 0) fail("not a PNG file");
    std::uint32_t width = 0, height = 0;
    int channels = 0;
    std::string idat;
    for (std::size_t at = 8; at + 12 <= file.size();) {
        const std::uint32_t length = big_endian(bytes + at);
        const std::string type = file.substr(at + 4, 4);
        if (at + 12 + length > file.size()) fail("truncated chunk " + type);
        const unsigned char* data = bytes + at + 8;
        if (type == "IHDR") {
            width = big_endian(data), height = big_endian(data + 4);
            const int depth = data[8], colour = data[9], interlace = data[12];
            if (depth != 8 || (colour != 2 && colour != 6) || interlace != 0)
                fail("expected 8-bit RGB or RGBA without interlacing");
            channels = colour == 6 ? 4 : 3;
        } else if (type == "IDAT") {
            idat.append(reinterpret_cast<const char*>(data), length);
        }
        at += 12 + length;
    }
    if (width == 0 || height == 0) fail("no image header");
    const std::size_t stride = std::size_t(width) * std::size_t(channels);
    std::vector<unsigned char> raw((stride + 1) * height);
    uLongf raw_size = uLongf(raw.size());
    if (uncompress(raw.data(), &raw_size, reinterpret_cast<const Bytef*>(idat.data()), uLong(idat.size())) != Z_OK ||
        raw_size != raw.size())
        fail("cannot inflate the image data");
    // Undo each row's filter (PNG specification, section 9).
    std::vector<unsigned char> pixels(stride * height), zero(stride, 0);
    for (std::uint32_t y = 0; y < height; ++y) {
        const unsigned char filter = raw[y * (stride + 1)];
        const unsigned char* line = &raw[y * (stride + 1) + 1];
        unsigned char* out = &pixels[y * stride];
        const unsigned char* up = y > 0 ? &pixels[(y - 1) * stride] : zero.data();
        for (std::size_t i = 0; i < stride; ++i) {
            const int a = i >= std::size_t(channels) ? out[i - channels] : 0, b = up[i],
                      c = i >= std::size_t(channels) ? up[i - channels] : 0;
            int v = line[i];
            switch (filter) {
            case 0: break;
            case 1: v += a; break;
            case 2: v += b; break;
            case 3: v += (a + b) / 2; break;
            case 4: v += paeth(a, b, c); break;
            default: fail("unknown row filter " + std::to_string(filter));
            }
            out[i] = static_cast<unsigned char>(v);
        }
    }
    std::map<std::uint32_t, std::size_t> colours;
    for (std::size_t p = 0; p < std::size_t(width) * height; ++p) {
        const unsigned char* px = &pixels[p * std::size_t(channels)];
        ++colours[std::uint32_t(px[0]) << 16 | px[1] << 8 | px[2]];
    }
    std::size_t background = 0;
    for (const auto& [_, n] : colours) background = std::max(background, n);
    const double total = double(width) * height, drawn = (total - double(background)) / total;
    std::printf("%ux%u pixels, %zu colours, %.1f%% off the background\n", width, height, colours.size(), 100 * drawn);
    if (drawn < 0.03 || colours.size() < 50) fail("the screenshot is (nearly) blank");
    return 0;
}
