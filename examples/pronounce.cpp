// pronounce: spelling to sound on the CMU Pronouncing Dictionary, with attention. A bidirectional
// LSTM reads a word's letters; an LSTM decoder writes its ARPAbet phonemes one at a time, and at
// every step attends over the encoder's states: multiplicative attention (Luong's "general" score)
// or additive attention (Bahdanau's), padding masked out with masked_softmax. The decoder feeds its
// attentional state back as input (Luong's input feeding). Training uses teacher forcing; decoding
// is greedy or by beam search.
//
// Stress marks are dropped (39 phonemes), as in the published results this is compared with.
// Words are held out by a seeded split, all of a held-out word's pronunciations with it. Words with
// several pronunciations (WORD(1) lines) train on each; a prediction counts as right if it matches
// any of them, and its phoneme errors are counted against the closest one. Entries spelled with
// digits or symbols are skipped. "loom", "tensor" and "backpropagation" are kept out of training.
//
// Ends with "test_per <x>" and "test_wer <y>" (beam search) on lines of their own, and writes an
// SVG heatmap of the attention of a few unseen words.
#include <loom/loom.hpp>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <numeric>
#include <set>
#include <sstream>

#include "text_data.hpp"

using namespace loom;

namespace {

// ---- the dictionary ----

constexpr std::int64_t kPad = 0, kBos = 1, kEos = 2;  // phoneme ids 0-2; phoneme k is id 3 + k
const std::vector<std::string> kPhonemes = {"AA", "AE", "AH", "AO", "AW", "AY", "B",  "CH", "D",  "DH",
                                            "EH", "ER", "EY", "F",  "G",  "HH", "IH", "IY", "JH", "K",
                                            "L",  "M",  "N",  "NG", "OW", "OY", "P",  "R",  "S",  "SH",
                                            "T",  "TH", "UH", "UW", "V",  "W",  "Y",  "Z",  "ZH"};
const std::string kLetters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ'";  // letter k is id 1 + k; 0 pads
const std::int64_t kPhonemeIds = 3 + static_cast<std::int64_t>(kPhonemes.size());
const std::int64_t kLetterIds = 1 + static_cast<std::int64_t>(kLetters.size());

using Phones = std::vector<std::int64_t>;

struct Word {
    std::string spelling;
    std::vector<Phones> pronunciations;
};

struct Dictionary {
    std::vector<Word> words;
    std::int64_t entries = 0, skipped = 0;  // entries read; entries spelled with digits or symbols
};

Dictionary read_cmudict(const std::string& path)
{
    Dictionary dict;
    std::map<std::string, std::size_t> index;
    const std::vector<std::string> lines = text_data::read_lines(path);
    for (std::size_t n = 1; n <= lines.size(); ++n) {
        const std::string& line = lines[n - 1];
        if (line.empty() || line.rfind(";;;", 0) == 0) continue;  // the dictionary's comment lines
        const auto fail = [&](const std::string& what) {
            text_data::bad_line(path, n, fmt::format("{}: \"{}\"", what, line.substr(0, 80)));
        };
        const std::size_t gap = line.find("  ");
        if (gap == std::string::npos || gap == 0)
            fail("expected a word, two spaces and its ARPAbet phonemes (\"ABANDON  AH0 B AE1 N D AH0 N\")");
        std::string word = line.substr(0, gap);
        if (word.back() == ')') {  // WORD(1): another pronunciation of WORD
            const std::size_t open = word.rfind('(');
            if (open == std::string::npos || open == 0) fail("expected WORD(n) for an alternate pronunciation");
            word.resize(open);
        }
        Phones phones;
        std::istringstream rest(line.substr(gap + 2));
        for (std::string p; rest >> p;) {
            if (p.back() >= '0' && p.back() <= '2') p.pop_back();  // the stress mark
            const auto it = std::find(kPhonemes.begin(), kPhonemes.end(), p);
            if (it == kPhonemes.end()) fail(fmt::format("\"{}\" is not an ARPAbet phoneme", p));
            phones.push_back(3 + (it - kPhonemes.begin()));
        }
        if (phones.empty()) fail("no phonemes after the word; expected the word, two spaces and its phonemes");
        ++dict.entries;
        if (word.find_first_not_of(kLetters) != std::string::npos) {
            ++dict.skipped;
            continue;
        }
        const auto [at, fresh] = index.try_emplace(word, dict.words.size());
        if (fresh) dict.words.push_back({word, {}});
        auto& prons = dict.words[at->second].pronunciations;
        if (std::find(prons.begin(), prons.end(), phones) == prons.end()) prons.push_back(phones);  // same without stress
    }
    if (dict.words.empty())
        throw Error(fmt::format("{}: no words in it; expected lines such as \"ABANDON  AH0 B AE1 N D AH0 N\"", path));
    return dict;
}

Phones letter_ids(const std::string& spelling)
{
    Phones ids;
    for (char c : spelling) ids.push_back(1 + static_cast<std::int64_t>(kLetters.find(c)));
    return ids;
}

std::string phoneme_text(const Phones& phones)
{
    std::string s;
    for (std::int64_t p : phones) s += (s.empty() ? "" : " ") + kPhonemes.at(static_cast<std::size_t>(p - 3));
    return s;
}

std::string lowercase(std::string s)
{
    for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return s;
}

// ---- the model ----

// Scores each source position for a decoder state; remember() sees the source once per batch.
struct Attention : nn::Module {
    virtual void remember(const Tensor& memory) = 0;      // encoder states [B, S, M]
    virtual Tensor scores(const Tensor& query) const = 0;  // decoder state [B, H] -> [B, S]
};

// Luong's "general" score q^T W m_s: one batched matmul per step.
struct MultiplicativeAttention : Attention {
    std::shared_ptr<nn::Dense> w;
    Tensor keys;
    MultiplicativeAttention(std::int64_t memory_size, std::int64_t hidden)
    {
        w = register_module("w", std::make_shared<nn::Dense>(memory_size, hidden, false));
    }
    void remember(const Tensor& memory) override { keys = (*w)(memory); }  // [B, S, H]
    Tensor scores(const Tensor& query) const override { return matmul(keys, query.unsqueeze(2)).squeeze(2); }
};

// Bahdanau's score v^T tanh(W m_s + U q).
struct AdditiveAttention : Attention {
    std::shared_ptr<nn::Dense> w, u, v;
    Tensor keys;
    AdditiveAttention(std::int64_t memory_size, std::int64_t hidden)
    {
        w = register_module("w", std::make_shared<nn::Dense>(memory_size, hidden, false));
        u = register_module("u", std::make_shared<nn::Dense>(hidden, hidden));
        v = register_module("v", std::make_shared<nn::Dense>(hidden, 1, false));
    }
    void remember(const Tensor& memory) override { keys = (*w)(memory); }
    Tensor scores(const Tensor& query) const override
    {
        return (*v)(tanh(keys + (*u)(query).unsqueeze(1))).squeeze(2);
    }
};

struct Seq2Seq : nn::Module {
    std::int64_t hidden;
    std::shared_ptr<nn::Embedding> letters, phonemes;
    std::shared_ptr<nn::LSTM> encoder;
    std::shared_ptr<nn::Dense> bridge, combine, out;
    std::shared_ptr<nn::LSTMCell> decoder;
    std::shared_ptr<Attention> attention;

    Seq2Seq(std::int64_t embed, std::int64_t hidden, bool additive) : hidden(hidden)
    {
        letters = register_module("letters", std::make_shared<nn::Embedding>(kLetterIds, embed, kPad));
        phonemes = register_module("phonemes", std::make_shared<nn::Embedding>(kPhonemeIds, embed, kPad));
        encoder = register_module(
            "encoder", std::make_shared<nn::LSTM>(nn::LSTMOptions(embed, hidden / 2).bidirectional(true)));
        bridge = register_module("bridge", std::make_shared<nn::Dense>(hidden, hidden));
        decoder = register_module("decoder", std::make_shared<nn::LSTMCell>(embed + hidden, hidden));
        if (additive) attention = register_module("attention", std::make_shared<AdditiveAttention>(hidden, hidden));
        else attention = register_module("attention", std::make_shared<MultiplicativeAttention>(hidden, hidden));
        combine = register_module("combine", std::make_shared<nn::Dense>(2 * hidden, hidden));
        out = register_module("out", std::make_shared<nn::Dense>(hidden, kPhonemeIds));
    }

    // What the decoder carries from step to step.
    struct DecoderState {
        nn::State lstm;     // {h, c}
        Tensor attended;    // the attentional state h~ of the last step, fed back as input
        Tensor memory, left_out;  // encoder states [B, S, H] and the padding mask [B, S]
    };

    DecoderState encode(const Tensor& source, const Tensor& lengths)
    {
        const auto encoded = (*encoder)((*letters)(source), {}, lengths);
        const Tensor& h = encoded.h_n();  // [2, B, H/2], each direction's state at its word's end
        const std::int64_t S = source.size(0), B = source.size(1);
        DecoderState s;
        s.memory = encoded.output.transpose(0, 1).contiguous();  // [B, S, H]
        s.left_out = ge(arange(double(S), kInt64).unsqueeze(0), lengths.unsqueeze(1));
        s.lstm = {tanh((*bridge)(concat({h.select(0, 0), h.select(0, 1)}, 1))), zeros({B, hidden})};
        s.attended = zeros({B, hidden});
        attention->remember(s.memory);
        return s;
    }

    // One decoder step from the previous phonemes [B]: logits [B, V] and the attention weights [B, S].
    std::pair<Tensor, Tensor> step(DecoderState& s, const Tensor& previous)
    {
        s.lstm = (*decoder)(concat({(*phonemes)(previous), s.attended}, 1), s.lstm);
        const Tensor& h = s.lstm[0];
        const Tensor weights = masked_softmax(attention->scores(h), s.left_out, 1);
        const Tensor context = matmul(weights.unsqueeze(1), s.memory).squeeze(1);  // [B, H]
        s.attended = tanh((*combine)(concat({context, h}, 1)));
        return {(*out)(s.attended), weights};
    }

    // Teacher forcing: the mean cross-entropy of the next phoneme given the true previous ones.
    Tensor loss(const Tensor& source, const Tensor& lengths, const Tensor& target_in, const Tensor& target_out)
    {
        DecoderState s = encode(source, lengths);
        std::vector<Tensor> logits;
        for (std::int64_t t = 0; t < target_in.size(0); ++t) logits.push_back(step(s, target_in.select(0, t)).first);
        nn::CrossEntropyOptions options;
        options.ignore_index = kPad;
        return nn::cross_entropy(stack(logits, 0).reshape({-1, kPhonemeIds}), target_out.reshape({-1}), options);
    }
};

// ---- batches ----

struct Example {
    std::size_t word, pronunciation;
};

struct Batch {
    Tensor source, lengths, target_in, target_out;
};

Batch make_batch(const std::vector<Word>& words, const std::vector<Example>& examples)
{
    std::vector<Phones> spellings, ins, outs;
    for (const Example& e : examples) {
        spellings.push_back(letter_ids(words[e.word].spelling));
        const Phones& p = words[e.word].pronunciations[e.pronunciation];
        Phones in{kBos}, out = p;
        in.insert(in.end(), p.begin(), p.end());
        out.push_back(kEos);
        ins.push_back(in);
        outs.push_back(out);
    }
    Batch b;
    std::tie(b.source, b.lengths) = train::pad_sequences(spellings, kPad);
    b.target_in = train::pad_sequences(ins, kPad).first;
    b.target_out = train::pad_sequences(outs, kPad).first;
    return b;
}

// Shuffled batches of examples of similar length, so that little of each batch is padding.
std::vector<std::vector<Example>> length_batches(const std::vector<Word>& words, std::vector<Example> examples,
                                                 std::int64_t batch, Generator& gen)
{
    text_data::shuffle(examples, gen);
    const std::size_t chunk = static_cast<std::size_t>(batch) * 32;
    for (std::size_t at = 0; at < examples.size(); at += chunk)
        std::stable_sort(examples.begin() + at, examples.begin() + std::min(examples.size(), at + chunk),
                         [&](const Example& a, const Example& b) {
                             return words[a.word].spelling.size() < words[b.word].spelling.size();
                         });
    std::vector<std::vector<Example>> batches;
    for (std::size_t at = 0; at < examples.size(); at += static_cast<std::size_t>(batch))
        batches.emplace_back(examples.begin() + at,
                             examples.begin() + std::min(examples.size(), at + static_cast<std::size_t>(batch)));
    text_data::shuffle(batches, gen);
    return batches;
}

// ---- decoding ----

std::int64_t max_phonemes(const std::string& spelling) { return static_cast<std::int64_t>(spelling.size()) + 8; }

struct Decoded {
    Phones phones;
    std::vector<std::vector<double>> attention;  // per output phoneme (and the end), the weights over the letters
};

std::vector<Decoded> greedy(Seq2Seq& model, const std::vector<std::string>& spellings)
{
    NoGradGuard no_grad;
    std::vector<Phones> letters;
    std::int64_t limit = 0;
    for (const auto& s : spellings) letters.push_back(letter_ids(s)), limit = std::max(limit, max_phonemes(s));
    const auto [source, lengths] = train::pad_sequences(letters, kPad);
    auto state = model.encode(source, lengths);
    const auto B = static_cast<std::int64_t>(spellings.size());
    std::vector<Decoded> result(spellings.size());
    std::vector<bool> done(spellings.size(), false);
    Tensor previous = full({B}, double(kBos), kInt64);
    for (std::int64_t t = 0; t < limit; ++t) {
        const auto [logits, weights] = model.step(state, previous);
        previous = argmax(logits, 1);
        const std::int64_t* next = previous.data_ptr<std::int64_t>();
        const Tensor w = weights.to(kFloat64).contiguous();
        const double* pw = w.data_ptr<double>();
        bool all_done = true;
        for (std::int64_t b = 0; b < B; ++b) {
            if (done[b]) continue;
            const auto n = static_cast<std::int64_t>(spellings[b].size());
            result[b].attention.emplace_back(pw + b * w.size(1), pw + b * w.size(1) + n);
            if (next[b] == kEos) done[b] = true;
            else result[b].phones.push_back(next[b]);
            all_done = all_done && done[b];
        }
        if (all_done) break;
    }
    return result;
}

// Beam search over all words at once: each word keeps `beam` hypotheses as rows of one batch.
// Scores are summed log-probabilities; a word is finished once its best ended hypothesis scores
// at least as well as every live one (scores only fall as hypotheses grow).
std::vector<Phones> beam_search(Seq2Seq& model, const std::vector<std::string>& spellings, std::int64_t beam)
{
    NoGradGuard no_grad;
    const auto B = static_cast<std::int64_t>(spellings.size()), K = beam, V = kPhonemeIds;
    std::vector<Phones> letters;
    std::int64_t limit = 0;
    for (const auto& s : spellings) letters.push_back(letter_ids(s)), limit = std::max(limit, max_phonemes(s));
    const auto [source, lengths] = train::pad_sequences(letters, kPad);
    auto state = model.encode(source, lengths);
    std::vector<std::int64_t> rows;  // each word's row repeated K times
    for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t k = 0; k < K; ++k) rows.push_back(b);
    const auto reorder = [&](const std::vector<std::int64_t>& from) {  // the decoder's state, row r from row from[r]
        const Tensor index = from_vector<std::int64_t>(from, {std::int64_t(from.size())});
        for (Tensor& t : state.lstm) t = index_select(t, 0, index);
        state.attended = index_select(state.attended, 0, index);
    };
    reorder(rows);
    // The K rows of a word share its memory, and hypotheses only move within their word's rows:
    // the memory and the attention's keys are repeated once and never reordered.
    const Tensor repeated = from_vector<std::int64_t>(rows, {B * K});
    state.memory = index_select(state.memory, 0, repeated);
    state.left_out = index_select(state.left_out, 0, repeated);
    model.attention->remember(state.memory);

    const double lost = -std::numeric_limits<double>::infinity();
    std::vector<double> score(static_cast<std::size_t>(B * K), lost);
    for (std::int64_t b = 0; b < B; ++b) score[b * K] = 0;  // all K rows start equal: expand one
    std::vector<Phones> hypothesis(static_cast<std::size_t>(B * K));
    std::vector<std::pair<double, Phones>> best(static_cast<std::size_t>(B), {lost, {}});
    std::vector<bool> finished(static_cast<std::size_t>(B), false);
    std::vector<std::int64_t> previous(static_cast<std::size_t>(B * K), kBos);
    for (std::int64_t t = 0; t < limit; ++t) {
        const Tensor step_logits = model.step(state, from_vector<std::int64_t>(previous, {B * K})).first;
        const Tensor logp = log_softmax(step_logits, 1).to(kFloat64).contiguous();
        const double* lp = logp.data_ptr<double>();
        std::vector<std::int64_t> from(static_cast<std::size_t>(B * K));
        std::vector<double> next_score(score.size(), lost);
        std::vector<Phones> next_hypothesis(hypothesis.size());
        bool all_finished = true;
        for (std::int64_t b = 0; b < B; ++b) {
            std::vector<std::pair<double, std::int64_t>> candidates;  // (score, row * V + phoneme)
            if (!finished[b])
                for (std::int64_t k = 0; k < K; ++k) {
                    const std::int64_t r = b * K + k;
                    if (score[r] == lost) continue;
                    for (std::int64_t v = kEos; v < V; ++v) candidates.emplace_back(score[r] + lp[r * V + v], r * V + v);
                }
            const auto keep = std::min<std::size_t>(candidates.size(), static_cast<std::size_t>(2 * K));
            std::partial_sort(candidates.begin(), candidates.begin() + keep, candidates.end(), std::greater<>());
            std::int64_t live = 0;
            for (std::size_t c = 0; c < keep && live < K; ++c) {
                const auto [s, code] = candidates[c];
                const std::int64_t r = code / V, v = code % V;
                if (v == kEos) {
                    if (s > best[b].first) best[b] = {s, hypothesis[r]};
                    continue;
                }
                const std::int64_t slot = b * K + live++;
                from[slot] = r;
                next_score[slot] = s;
                next_hypothesis[slot] = hypothesis[r];
                next_hypothesis[slot].push_back(v);
                previous[slot] = v;
            }
            for (std::int64_t k = live; k < K; ++k) from[b * K + k] = b * K;  // dead rows: any row will do
            const double best_live = live ? next_score[b * K] : lost;
            finished[b] = finished[b] || best[b].first >= best_live;
            all_finished = all_finished && finished[b];
        }
        score = std::move(next_score);
        hypothesis = std::move(next_hypothesis);
        if (all_finished) break;
        reorder(from);
    }
    std::vector<Phones> result;
    for (std::int64_t b = 0; b < B; ++b)  // a word that never ended keeps its best live hypothesis
        result.push_back(best[b].first > lost ? best[b].second : hypothesis[b * K]);
    return result;
}

std::int64_t edit_distance(const Phones& a, const Phones& b)
{
    std::vector<std::int64_t> row(b.size() + 1);
    std::iota(row.begin(), row.end(), 0);
    for (std::size_t i = 1; i <= a.size(); ++i) {
        std::int64_t diagonal = row[0];
        row[0] = static_cast<std::int64_t>(i);
        for (std::size_t j = 1; j <= b.size(); ++j) {
            const std::int64_t up = row[j];
            row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] != b[j - 1])});
            diagonal = up;
        }
    }
    return row.back();
}

struct Score {
    double per, wer;
};

// Phoneme errors against each word's closest pronunciation over that pronunciation's length;
// a word is wrong unless the prediction is one of its pronunciations.
Score score(const std::vector<Word>& words, const std::vector<Phones>& predicted)
{
    std::int64_t errors = 0, length = 0, wrong = 0;
    for (std::size_t i = 0; i < words.size(); ++i) {
        std::int64_t closest = -1, closest_length = 0;
        for (const Phones& p : words[i].pronunciations) {
            const std::int64_t d = edit_distance(predicted[i], p);
            if (closest < 0 || d < closest) closest = d, closest_length = static_cast<std::int64_t>(p.size());
        }
        errors += closest;
        length += closest_length;
        wrong += closest > 0;
    }
    return {double(errors) / double(length), double(wrong) / double(words.size())};
}

template <class F> std::vector<Phones> in_batches(const std::vector<Word>& words, std::int64_t batch, F&& decode)
{
    std::vector<Phones> all;
    for (std::size_t at = 0; at < words.size(); at += static_cast<std::size_t>(batch)) {
        std::vector<std::string> spellings;
        for (std::size_t i = at; i < std::min(words.size(), at + static_cast<std::size_t>(batch)); ++i)
            spellings.push_back(words[i].spelling);
        for (Phones& p : decode(spellings)) all.push_back(std::move(p));
    }
    return all;
}

// ---- the picture ----

// Heatmaps of attention weights, one panel per word: letters across, phonemes down, darker = more weight.
void write_attention_svg(const std::string& path, const std::vector<std::string>& spellings,
                         const std::vector<Decoded>& decoded)
{
    const int cell = 22, margin = 40, label = 34;
    int width = margin, height = 0;
    for (std::size_t i = 0; i < spellings.size(); ++i) {
        width += label + cell * static_cast<int>(spellings[i].size()) + margin;
        height = std::max(height, cell * static_cast<int>(decoded[i].attention.size()));
    }
    height += 2 * margin + 20;
    std::string svg = fmt::format(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" "
        "font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        "<text x=\"{}\" y=\"18\" font-size=\"14\">Attention of the decoder (rows: phonemes it wrote, columns: letters "
        "it read)</text>\n",
        width, height, margin);
    int x0 = margin;
    for (std::size_t i = 0; i < spellings.size(); ++i) {
        const auto& d = decoded[i];
        const int left = x0 + label, top = margin + 20;
        for (std::size_t c = 0; c < spellings[i].size(); ++c)
            svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", left + cell * int(c) + cell / 2,
                               top - 6, spellings[i][c]);
        for (std::size_t r = 0; r < d.attention.size(); ++r) {
            const std::string row_name = r < d.phones.size() ? kPhonemes.at(std::size_t(d.phones[r] - 3)) : "end";
            svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n", left - 4,
                               top + cell * int(r) + cell / 2 + 4, row_name);
            for (std::size_t c = 0; c < d.attention[r].size(); ++c)
                svg += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"#08306b\" "
                                   "fill-opacity=\"{:.3f}\" stroke=\"#ddd\"/>\n",
                                   left + cell * int(c), top + cell * int(r), cell, cell, d.attention[r][c]);
        }
        x0 += label + cell * static_cast<int>(spellings[i].size()) + margin;
    }
    svg += "</svg>\n";
    const std::string tmp = path + ".tmp";
    {
        std::ofstream f(tmp);
        f << svg;
        if (!f) throw Error(fmt::format("pronounce: cannot write {}", tmp));
    }
    std::filesystem::rename(tmp, path);
}

}  // namespace

int main(int argc, char** argv)
{
    CLI::App app{"pronounce: spelling to sound on CMUdict with an attentional encoder-decoder"};
    std::string data = std::string(LOOM_EXAMPLE_DATA) + "/cmudict.txt", svg = "pronounce_attention.svg";
    std::string attention = "multiplicative";
    std::int64_t steps = 0, hidden = 128, embed = 48, batch = 64, beam = 4, seed = 0, eval_words = 0, report = 200;
    double minutes = 2.0, lr = 3e-3, test_fraction = 0.05;
    app.add_option("--data", data, "CMUdict file");
    app.add_option("--steps", steps, "stop after this many training steps (0: only --minutes)")->check(CLI::NonNegativeNumber);
    app.add_option("--minutes", minutes, "stop training after this many minutes (0: only --steps)")
        ->check(CLI::NonNegativeNumber);
    app.add_option("--hidden", hidden, "encoder (both directions) and decoder size")->check(CLI::Range(2, 4096));
    app.add_option("--embed", embed, "letter and phoneme embedding size")->check(CLI::Range(1, 4096));
    app.add_option("--batch", batch, "words per step")->check(CLI::Range(1, 65536));
    app.add_option("--beam", beam, "beam width (1: greedy)")->check(CLI::Range(1, 64));
    app.add_option("--lr", lr, "Adam's learning rate, decayed linearly to a tenth")->check(CLI::PositiveNumber);
    app.add_option("--attention", attention, "multiplicative (Luong) or additive (Bahdanau)")
        ->check(CLI::IsMember({"multiplicative", "additive"}));
    app.add_option("--test-fraction", test_fraction, "share of the words held out")->check(CLI::Range(0.001, 0.5));
    app.add_option("--eval-words", eval_words, "score only this many held-out words (0: all)")
        ->check(CLI::NonNegativeNumber);
    app.add_option("--report", report, "print the loss every this many steps")->check(CLI::PositiveNumber);
    app.add_option("--svg", svg, "where to write the attention heatmap");
    app.add_option("--seed", seed, "random seed of the split, the initial weights and the batches");
    CLI11_PARSE(app, argc, argv);
    if (steps == 0 && minutes == 0) {
        std::fprintf(stderr, "pronounce: give --steps or --minutes a positive value\n");
        return 1;
    }
    manual_seed(static_cast<std::uint64_t>(seed));

    Dictionary dict;
    try {
        dict = read_cmudict(data);
    } catch (const Error& e) {
        std::fprintf(stderr, "pronounce: %s\n", e.what());
        return 1;
    }
    // A seeded split by word; the three words shown at the end are never trained on.
    const std::set<std::string> shown = {"LOOM", "TENSOR", "BACKPROPAGATION"};
    Generator gen(static_cast<std::uint64_t>(seed) + 1);
    std::vector<Word> train_words, test_words;
    for (const Word& w : dict.words) {
        if (shown.count(w.spelling)) continue;
        (gen.uniform01() < test_fraction ? test_words : train_words).push_back(w);
    }
    text_data::shuffle(test_words, gen);  // alphabetical no more: --eval-words and the table sample all letters
    std::vector<Example> examples;
    for (std::size_t i = 0; i < train_words.size(); ++i)
        for (std::size_t p = 0; p < train_words[i].pronunciations.size(); ++p) examples.push_back({i, p});
    if (eval_words > 0 && eval_words < static_cast<std::int64_t>(test_words.size())) test_words.resize(std::size_t(eval_words));
    std::printf("%lld entries read, %lld spelled with digits or symbols skipped: %zu words, %zu held out; "
                "%zu training pronunciations\n",
                (long long)dict.entries, (long long)dict.skipped, dict.words.size(), test_words.size(), examples.size());

    Seq2Seq model(embed, hidden, attention == "additive");
    optim::Adam opt(model.parameters(), optim::AdamOptions(lr));
    std::int64_t parameters = 0;
    for (const Tensor& p : model.parameters()) parameters += p.numel();
    std::printf("%s attention, hidden %lld, %lld parameters\n", attention.c_str(), (long long)hidden,
                (long long)parameters);

    const auto start = std::chrono::steady_clock::now();
    const auto elapsed_minutes = [&] {
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / 60;
    };
    std::int64_t step = 0, epoch = 0;
    double running = 0;
    bool stop = false;
    while (!stop) {
        ++epoch;
        for (const auto& examples_of_batch : length_batches(train_words, examples, batch, gen)) {
            const double progress = std::max(steps ? double(step) / double(steps) : 0.0,
                                             minutes > 0 ? elapsed_minutes() / minutes : 0.0);
            if (progress >= 1) {
                stop = true;
                break;
            }
            opt.set_lr(lr * (1 - 0.9 * progress), 0);
            const Batch b = make_batch(train_words, examples_of_batch);
            opt.zero_grad();
            const Tensor loss = model.loss(b.source, b.lengths, b.target_in, b.target_out);
            loss.backward();
            nn::utils::clip_grad_norm(model.parameters(), 5.0);
            opt.step();
            running = step ? 0.98 * running + 0.02 * loss.item<double>() : loss.item<double>();
            if (++step % report == 0)
                std::printf("step %5lld  epoch %lld  loss %.3f  %.1f min\n", (long long)step, (long long)epoch, running,
                            elapsed_minutes()),
                    std::fflush(stdout);
        }
    }
    std::printf("trained %lld steps (%.2f epochs) in %.1f min; final loss %.3f\n", (long long)step,
                double(step * batch) / double(examples.size()), elapsed_minutes(), running);
    model.eval();

    const auto greedy_phones = in_batches(test_words, 256, [&](const std::vector<std::string>& s) {
        std::vector<Phones> p;
        for (auto& d : greedy(model, s)) p.push_back(std::move(d.phones));
        return p;
    });
    const auto beam_phones = in_batches(test_words, 256 / beam, [&](const std::vector<std::string>& s) {
        return beam_search(model, s, beam);
    });
    const Score g = score(test_words, greedy_phones), bs = score(test_words, beam_phones);

    std::printf("\nunseen words (reference: the dictionary's pronunciation closest to the prediction, stress dropped)\n");
    std::printf("%-16s %-30s %-30s %s\n", "word", "reference", "predicted (beam search)", "");
    for (std::size_t i = 0; i < test_words.size() && i < 12; ++i) {
        const Word& w = test_words[i];
        const Phones& closest = *std::min_element(
            w.pronunciations.begin(), w.pronunciations.end(),
            [&](const Phones& a, const Phones& b) { return edit_distance(a, beam_phones[i]) < edit_distance(b, beam_phones[i]); });
        const std::int64_t errors = edit_distance(closest, beam_phones[i]);
        std::printf("%-16s %-30s %-30s %s\n", lowercase(w.spelling).c_str(), phoneme_text(closest).c_str(),
                    phoneme_text(beam_phones[i]).c_str(),
                    errors ? fmt::format("{} error{}", errors, errors > 1 ? "s" : "").c_str() : "right");
    }
    std::printf("\nwords the model never saw:\n");
    std::vector<std::string> extra(shown.begin(), shown.end());
    std::vector<Word> extra_words;
    for (const auto& s : extra) extra_words.push_back({s, {}});
    const auto extra_phones = beam_search(model, extra, beam);
    for (std::size_t i = 0; i < extra.size(); ++i) {
        const auto in_dict = std::find_if(dict.words.begin(), dict.words.end(),
                                          [&](const Word& w) { return w.spelling == extra[i]; });
        std::printf("%-16s %-30s %s\n", lowercase(extra[i]).c_str(), phoneme_text(extra_phones[i]).c_str(),
                    in_dict == dict.words.end() ? "(in no dictionary)"
                                                : ("(CMUdict: " + phoneme_text(in_dict->pronunciations[0]) + ")").c_str());
    }

    // The attention of a few unseen words the model gets right, as a picture.
    std::vector<std::string> pictured;
    for (std::size_t i = 0; i < test_words.size() && pictured.size() < 4; ++i) {
        const Word& w = test_words[i];
        const bool right = std::find(w.pronunciations.begin(), w.pronunciations.end(), greedy_phones[i]) != w.pronunciations.end();
        // Words with letters that make no sound of their own (two or more fewer phonemes than letters) show the most.
        if (right && w.spelling.size() >= 6 && w.spelling.size() <= 10 && greedy_phones[i].size() + 2 <= w.spelling.size())
            pictured.push_back(w.spelling);
    }
    if (!pictured.empty()) {
        try {
            write_attention_svg(svg, pictured, greedy(model, pictured));
            std::printf("\nattention of %zu unseen words written to %s\n", pictured.size(), svg.c_str());
        } catch (const std::exception& e) {
            std::fprintf(stderr, "pronounce: %s\n", e.what());
            return 1;
        }
    }

    std::printf("\n%zu held-out words: greedy PER %.2f%%, WER %.2f%%; beam %lld PER %.2f%%, WER %.2f%%\n",
                test_words.size(), 100 * g.per, 100 * g.wer, (long long)beam, 100 * bs.per, 100 * bs.wer);
    std::printf("greedy_per %.4f\ngreedy_wer %.4f\n", g.per, g.wer);
    std::printf("test_per %.4f\ntest_wer %.4f\n", bs.per, bs.wer);
    return 0;
}
