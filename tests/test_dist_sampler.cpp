// loom::dist in one process (no mpirun): the shard sampler's arithmetic, and that every call is
// the identity on a world of one. The two-process behaviour is dist_test.sh's.
#include <loom/dist/dist.hpp>

#include <algorithm>
#include <set>

#include "helpers.hpp"

using namespace loom;

TEST_CASE("ShardSampler: disjoint equal shares that cover every example, reshuffled each epoch")
{
    for (const std::int64_t n : {10, 11, 1, 3}) {
        std::multiset<std::int64_t> seen;
        for (int rank = 0; rank < 3; ++rank) {
            const auto mine = dist::ShardSampler(n, 5, rank, 3).indices(2);
            CHECK(std::int64_t(mine.size()) == (n + 2) / 3);  // the same count on every process
            seen.insert(mine.begin(), mine.end());
        }
        for (std::int64_t i = 0; i < n; ++i) CHECK(seen.count(i) >= 1);               // every example
        CHECK(std::int64_t(seen.size()) - n == (3 - n % 3) % 3);                       // padding only
    }
    const dist::ShardSampler s(100, 5, 1, 2);
    CHECK(s.indices(0) == dist::ShardSampler(100, 5, 1, 2).indices(0));  // same seed, same order
    CHECK(s.indices(0) != s.indices(1));                                  // a new order each epoch
    const auto in_order = dist::ShardSampler(6, 5, 1, 2, false).indices(3);
    CHECK(in_order == std::vector<std::int64_t>{1, 3, 5});
    testing::check_error([] { dist::ShardSampler(5, 0, 2, 2); }, {"ShardSampler", "rank 2", "world of 2"});
    testing::check_error([] { dist::ShardSampler(0, 0, 0, 1); }, {"ShardSampler", "at least one example"});
}

TEST_CASE("without mpirun, dist is a world of one process")
{
    int argc = 1;
    char name[] = "test";
    char* args[] = {name, nullptr};
    char** argv = args;
    dist::Environment env(&argc, &argv);
    CHECK(dist::rank() == 0);
    CHECK(dist::world_size() == 1);
    CHECK(dist::is_main());
    CHECK(dist::sum(2.5) == 2.5);
    dist::barrier();
    nn::Dense layer(3, 2, true, kFloat64);
    const Tensor before = layer.weight.clone();
    dist::check_same_model(layer);
    dist::broadcast_parameters(layer);
    CHECK(testing::close_tensors(layer.weight, before, 0));
    (layer(ones({4, 3}, kFloat64)).sum()).backward();
    const Tensor grad = layer.weight.grad().clone();
    dist::GradientAverager(layer.parameters(), 64).average(3);
    CHECK(testing::close_tensors(layer.weight.grad(), grad, 0));  // the average of one
    const train::Parallel p = dist::data_parallel(layer);
    CHECK(p.world_size == 1);
    testing::check_error([&] { dist::GradientAverager({ones({2}, kInt64)}); }, {"GradientAverager", "int64", "float32 or float64"});
}
