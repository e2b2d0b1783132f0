#include "dist.hpp"

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "../core/random.hpp"

namespace loom::dist {

namespace {

void check_mpi(int code, const char* what)
{
    if (code == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(code, text, &length);
    fail("dist", "{} failed: {}", what, std::string(text, static_cast<std::size_t>(length)));
}

MPI_Datatype mpi_type(DType dtype)
{
    if (dtype == kFloat32) return MPI_FLOAT;
    if (dtype == kFloat64) return MPI_DOUBLE;
    if (dtype == kInt64) return MPI_INT64_T;
    if (dtype == kBool) return MPI_C_BOOL;
    fail("dist", "no MPI type for dtype {}", dtype);
}

void* raw_data(const Tensor& t)
{
    return dispatch(t.dtype(), [&]<class T>() { return static_cast<void*>(t.data_ptr<T>()); });
}

// One line per parameter and buffer: "parameter name float32 [3, 4]".
std::vector<std::string> model_signature(const nn::Module& model)
{
    std::vector<std::string> lines;
    for (const auto& [name, t] : model.named_parameters())
        lines.push_back(fmt::format("parameter {} {} {}", name, t.dtype(), t.sizes()));
    for (const auto& [name, t] : model.named_buffers())
        lines.push_back(fmt::format("buffer {} {} {}", name, t.dtype(), t.sizes()));
    return lines;
}

std::string joined(const std::vector<std::string>& lines)
{
    std::string s;
    for (const auto& line : lines) s += line + '\n';
    return s;
}

std::vector<std::string> split_lines(const std::string& s)
{
    std::vector<std::string> lines;
    for (std::size_t at = 0; at < s.size();) {
        const std::size_t end = s.find('\n', at);
        lines.push_back(s.substr(at, end - at));
        at = end + 1;
    }
    return lines;
}

bool mpi_running()
{
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    return initialized && !finalized;
}

// mpirun (Open MPI's, or a PMI/PMIx launcher) tells its processes so in their environment.
bool launched_by_mpirun()
{
    return std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMI_SIZE") || std::getenv("PMIX_RANK");
}

}  // namespace

Environment::Environment(int* argc, char*** argv)
{
    // Started without mpirun: a world of one process, and MPI is not started at all.
    if (!launched_by_mpirun() || mpi_running()) return;
    check_mpi(MPI_Init(argc, argv), "MPI_Init");
    // Errors come back as codes that check_mpi turns into loom::Error, instead of ending the job
    // from inside MPI with a message that does not say which call failed.
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
}

Environment::~Environment()
{
    if (mpi_running()) MPI_Finalize();
}

int rank()
{
    if (!mpi_running()) return 0;
    int r = 0;
    check_mpi(MPI_Comm_rank(MPI_COMM_WORLD, &r), "MPI_Comm_rank");
    return r;
}

int world_size()
{
    if (!mpi_running()) return 1;
    int n = 1;
    check_mpi(MPI_Comm_size(MPI_COMM_WORLD, &n), "MPI_Comm_size");
    return n;
}

bool is_main() { return rank() == 0; }

void barrier()
{
    if (mpi_running()) check_mpi(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier");
}

void abort(const std::exception& error)
{
    std::fprintf(stderr, "rank %d: %s\n", rank(), error.what());
    std::fflush(stderr);
    if (mpi_running()) MPI_Abort(MPI_COMM_WORLD, 1);
    std::_Exit(1);  // MPI_Abort does not return; this is for the compiler
}

double sum(double value)
{
    if (world_size() == 1) return value;
    double total = 0;
    check_mpi(MPI_Allreduce(&value, &total, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD), "MPI_Allreduce");
    return total;
}

namespace {

// Every process compares its `lines` with process 0's and all learn whether any differed: each
// throws a loom::Error, the one that differs naming the first difference. `what` names the
// thing compared ("the model").
void check_same_lines(const std::vector<std::string>& mine, const std::string& what)
{
    if (world_size() == 1) return;
    std::string theirs = joined(mine);
    long long length = static_cast<long long>(theirs.size());
    check_mpi(MPI_Bcast(&length, 1, MPI_LONG_LONG, 0, MPI_COMM_WORLD), "MPI_Bcast");
    theirs.resize(static_cast<std::size_t>(length));
    check_mpi(MPI_Bcast(theirs.data(), static_cast<int>(length), MPI_CHAR, 0, MPI_COMM_WORLD), "MPI_Bcast");
    const std::vector<std::string> reference = split_lines(theirs);
    std::string difference;
    for (std::size_t k = 0; k < std::max(mine.size(), reference.size()) && difference.empty(); ++k) {
        const std::string a = k < mine.size() ? mine[k] : "nothing", b = k < reference.size() ? reference[k] : "nothing";
        if (a != b) difference = fmt::format("entry {} of {} is \"{}\" here but \"{}\" on rank 0", k + 1, what, a, b);
    }
    int differs = !difference.empty(), any = 0;
    check_mpi(MPI_Allreduce(&differs, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD), "MPI_Allreduce");
    if (differs) fail("dist", "{} differs across processes: {}", what, difference);
    if (any) fail("dist", "{} differs across processes (the process that differs names the difference)", what);
}

}  // namespace

void check_same_model(const nn::Module& model) { check_same_lines(model_signature(model), "the model"); }

void broadcast_parameters(nn::Module& model, int root)
{
    if (world_size() == 1) return;
    const auto send = [&](const Tensor& t) {
        LOOM_CHECK(t.is_contiguous(), "broadcast_parameters", "expects contiguous parameters and buffers");
        LOOM_CHECK(t.numel() <= std::numeric_limits<int>::max(), "broadcast_parameters",
                   "a tensor of {} elements is more than one MPI call can send ({})", t.numel(),
                   std::numeric_limits<int>::max());
        check_mpi(MPI_Bcast(raw_data(t), static_cast<int>(t.numel()), mpi_type(t.dtype()), root, MPI_COMM_WORLD),
                  "MPI_Bcast");
    };
    for (const auto& [name, t] : model.named_parameters()) send(t);
    for (const auto& [name, t] : model.named_buffers()) send(t);
}

struct GradientAverager::State {
    std::vector<Tensor> parameters;
    std::vector<std::vector<std::size_t>> buckets;  // parameter indices, one dtype per bucket
    std::vector<std::size_t> bucket_of;              // per parameter
    // One averaging: each bucket packed (weighted gradients, flattened) and its all-reduce.
    std::vector<Tensor> packed;
    std::vector<MPI_Request> requests;
    std::size_t started = 0;  // buckets 0 .. started-1 are on their way, in order
    // Set by start_during_backward(): the parameters' hooks start buckets as they fill.
    bool during_backward = false;
    double weight = 1;
    std::vector<bool> final_;         // per parameter: its gradient is final in this backward
    std::vector<std::size_t> filled;  // per bucket: its parameters whose gradient is final
    std::size_t started_during_backward = 0, last_started_during_backward = 0;

    void start_bucket(std::size_t b)
    {
        std::vector<Tensor> parts;
        for (std::size_t i : buckets[b]) {
            const Tensor& p = parameters[i];
            const Tensor g = p.grad();
            parts.push_back(g.defined() ? (g * weight).reshape({-1}) : zeros({p.numel()}, p.dtype()));
        }
        packed[b] = contiguous(concat(parts, 0));
        check_mpi(MPI_Iallreduce(MPI_IN_PLACE, raw_data(packed[b]), static_cast<int>(packed[b].numel()),
                                 mpi_type(packed[b].dtype()), MPI_SUM, MPI_COMM_WORLD, &requests[b]),
                  "MPI_Iallreduce");
    }

    // A parameter's gradient is final: start every bucket now full, in order. MPI moves a
    // non-blocking reduction on only inside its calls, so the ones already started are tested.
    void on_final(std::size_t i)
    {
        if (!during_backward || final_[i]) return;
        NoGradGuard no_grad;
        final_[i] = true;
        ++filled[bucket_of[i]];
        while (started < buckets.size() && filled[started] == buckets[started].size()) {
            start_bucket(started++);
            ++started_during_backward;
        }
        for (std::size_t b = 0; b < started; ++b) {
            int done = 0;
            check_mpi(MPI_Test(&requests[b], &done, MPI_STATUS_IGNORE), "MPI_Test");
        }
    }

    // Starts the buckets not started yet, in order, and waits for every one.
    void finish()
    {
        while (started < buckets.size()) start_bucket(started++);
        for (std::size_t b = 0; b < buckets.size(); ++b) check_mpi(MPI_Wait(&requests[b], MPI_STATUS_IGNORE), "MPI_Wait");
    }

    void begin(double w)
    {
        weight = w;
        started = 0;
        started_during_backward = 0;
        packed.assign(buckets.size(), Tensor());
        requests.assign(buckets.size(), MPI_REQUEST_NULL);
        final_.assign(parameters.size(), false);
        filled.assign(buckets.size(), 0);
    }
};

GradientAverager::GradientAverager(std::vector<Tensor> parameters, std::size_t bucket_bytes)
    : state_(std::make_shared<State>())
{
    State& s = *state_;
    s.parameters = std::move(parameters);
    const std::vector<Tensor>& params = s.parameters;
    // Every process must pass the same list: a different count, dtype or shape would pair up
    // unrelated numbers in the all-reduce, or leave a process waiting for ever.
    std::vector<std::string> signature{fmt::format("{} parameters, buckets of {} bytes", params.size(), bucket_bytes)};
    for (std::size_t i = 0; i < params.size(); ++i)
        signature.push_back(params[i].defined() ? fmt::format("parameter {} {} {}", i, params[i].dtype(), params[i].sizes())
                                                : fmt::format("parameter {} undefined", i));
    check_same_lines(signature, "the averager's parameter list");
    LOOM_CHECK(bucket_bytes > 0, "GradientAverager", "expects a positive bucket size");
    for (std::size_t i = 0; i < params.size(); ++i) {
        const Tensor& p = params[i];
        LOOM_CHECK(p.dtype() == kFloat32 || p.dtype() == kFloat64, "GradientAverager",
                   "parameter {} is {}; expected float32 or float64", i, p.dtype());
        LOOM_CHECK(p.numel() <= std::numeric_limits<int>::max(), "GradientAverager",
                   "parameter {} has {} elements, more than one MPI call can reduce ({})", i, p.numel(),
                   std::numeric_limits<int>::max());
    }
    // From the last parameter back: backward finishes the last layers' gradients first, so the
    // first buckets fill first and can start while backward goes on.
    std::size_t bytes = 0;
    s.bucket_of.assign(params.size(), 0);
    for (std::size_t i = params.size(); i-- > 0;) {
        const Tensor& p = params[i];
        const std::size_t size = static_cast<std::size_t>(p.numel()) * dtype_size(p.dtype());
        const bool too_many = !s.buckets.empty() && bytes / dtype_size(p.dtype()) + static_cast<std::size_t>(p.numel()) >
                                                            static_cast<std::size_t>(std::numeric_limits<int>::max());
        if (s.buckets.empty() || too_many || bytes + size > bucket_bytes || params[s.buckets.back()[0]].dtype() != p.dtype()) {
            s.buckets.emplace_back();
            bytes = 0;
        }
        s.buckets.back().push_back(i);
        s.bucket_of[i] = s.buckets.size() - 1;
        bytes += size;
    }
    if (world_size() == 1) return;
    for (std::size_t i = 0; i < params.size(); ++i)
        params[i].register_post_accumulate_grad_hook([state = std::weak_ptr<State>(state_), i](const Tensor&) {
            if (const auto s = state.lock()) s->on_final(i);
        });
}

std::size_t GradientAverager::buckets() const { return state_->buckets.size(); }

std::size_t GradientAverager::buckets_started_during_backward() const { return state_->last_started_during_backward; }

void GradientAverager::start_during_backward(double weight)
{
    if (world_size() == 1) return;
    LOOM_CHECK(!state_->during_backward, "GradientAverager",
               "start_during_backward() was called twice without average() between; call average() after each backward()");
    state_->begin(weight);
    state_->during_backward = true;
}

void GradientAverager::average(double weight)
{
    if (world_size() == 1) return;  // one process: its gradient is the average
    State& s = *state_;
    NoGradGuard no_grad;
    const bool overlapped = s.during_backward;
    s.during_backward = false;
    if (!overlapped) s.begin(weight);
    // Which parameters have a gradient anywhere, and the total weight, in one small reduction.
    // The last two: the weight, and how many processes were given one that is not a finite
    // number >= 0 (every process must learn of it, or the others would wait for ever). With the
    // buckets started during backward, this comes after them on every process, as collectives
    // must come in the same order everywhere; a weight different from the one given to
    // start_during_backward() counts as a bad one.
    const bool mismatched = overlapped && weight != s.weight;
    const bool bad_weight = !(std::isfinite(weight) && weight >= 0) || mismatched;
    std::vector<double> flags(s.parameters.size() + 2);
    for (std::size_t i = 0; i < s.parameters.size(); ++i) flags[i] = s.parameters[i].grad().defined();
    flags[s.parameters.size()] = bad_weight ? 0 : weight;
    flags.back() = bad_weight;
    if (overlapped) s.finish();
    std::vector<double> totals(flags.size());
    check_mpi(MPI_Allreduce(flags.data(), totals.data(), static_cast<int>(flags.size()), MPI_DOUBLE, MPI_SUM,
                            MPI_COMM_WORLD),
              "MPI_Allreduce");
    s.last_started_during_backward = s.started_during_backward;
    LOOM_CHECK(!mismatched, "GradientAverager", "expects the weight given to start_during_backward() ({}), got {}",
               s.weight, weight);
    LOOM_CHECK(!bad_weight, "GradientAverager", "expects a weight that is a finite number >= 0 (this process's "
               "examples in the batch), got {}", weight);
    LOOM_CHECK(totals.back() == 0, "GradientAverager",
               "another process was given a weight that is not a finite number >= 0, or not the one it gave "
               "start_during_backward() (it names it); nothing was averaged");
    const double total_weight = totals[s.parameters.size()];
    LOOM_CHECK(total_weight > 0, "GradientAverager", "the weights of all processes sum to {}; expected > 0",
               total_weight);
    if (!overlapped) s.finish();
    for (std::size_t b = 0; b < s.buckets.size(); ++b) {
        std::int64_t at = 0;
        for (std::size_t i : s.buckets[b]) {
            const Tensor& p = s.parameters[i];
            if (totals[i] > 0) p.set_grad((s.packed[b].narrow(0, at, p.numel()) / total_weight).reshape(p.sizes()));
            at += p.numel();
        }
    }
}

ShardSampler::ShardSampler(std::int64_t n, std::uint64_t seed, int rank, int world_size, bool shuffle)
    : n_(n), seed_(seed), rank_(rank), world_(world_size), shuffle_(shuffle)
{
    LOOM_CHECK(n > 0, "ShardSampler", "expects at least one example, got {}", n);
    LOOM_CHECK(world_size > 0 && rank >= 0 && rank < world_size, "ShardSampler",
               "rank {} is not in a world of {} processes", rank, world_size);
}

std::vector<std::int64_t> ShardSampler::indices(std::int64_t epoch) const
{
    Generator gen(seed_ + static_cast<std::uint64_t>(epoch));
    const std::vector<std::int64_t> order = train::minibatches(n_, n_, shuffle_ ? &gen : nullptr).front();
    const std::int64_t each = (n_ + world_ - 1) / world_;
    std::vector<std::int64_t> mine;
    for (std::int64_t k = 0; k < each; ++k) mine.push_back(order[std::size_t((rank_ + k * world_) % n_)]);
    return mine;
}

train::Parallel data_parallel(nn::Module& model, std::size_t bucket_bytes)
{
    check_same_model(model);
    broadcast_parameters(model);
    auto averager = std::make_shared<GradientAverager>(model.parameters(), bucket_bytes);
    train::Parallel p;
    p.rank = rank();
    p.world_size = world_size();
    p.shard = [rank = p.rank, world = p.world_size](std::int64_t n, bool shuffle, std::uint64_t seed, std::int64_t epoch) {
        // Shards of sets of different sizes would give the processes different numbers of
        // batches, and one would wait for ever in an all-reduce the others never join.
        check_same_lines({fmt::format("{} examples, {}, seed {}", n, shuffle ? "shuffled" : "in order", seed)},
                         "the training set");
        return ShardSampler(n, seed, rank, world, shuffle).indices(epoch);
    };
    p.before_backward = [averager](double weight) { averager->start_during_backward(weight); };
    p.average_gradients = [averager](double weight) { averager->average(weight); };
    p.sum = [](double value) { return sum(value); };
    return p;
}

}  // namespace loom::dist
