// loom against PyTorch: reference files written by scripts/make_reference.py (float64), checked
// to 1e-10 for every output and every gradient. PyTorch is not needed to run this.
#include "helpers.hpp"

#include <filesystem>

using namespace loom;
using testing::close_tensors;

namespace {

const std::string data_dir = LOOM_TEST_DATA;

// Parameters stored as "param.<name>", with their gradients as "grad.param.<name>".
NamedTensorMap parameters_in(const NamedTensorMap& file)
{
    NamedTensorMap dict;
    for (const auto& [key, t] : file)
        if (key.rfind("param.", 0) == 0) dict[key.substr(6)] = t;
    return dict;
}

void check_close(const Tensor& got, const Tensor& expected, const std::string& what)
{
    CHECK_MESSAGE(close_tensors(got, expected, 1e-10), what << ": got " << got << "\nexpected " << expected);
}

nn::Reduction reduction_of(const std::string& name)
{
    return name == "none" ? nn::Reduction::None : name == "sum" ? nn::Reduction::Sum : nn::Reduction::Mean;
}

}  // namespace

TEST_CASE("Dense matches PyTorch's Linear")
{
    const auto file = load(data_dir + "/dense.safetensors");
    nn::Dense dense(4, 3, true, kFloat64);
    dense.load_state_dict(parameters_in(file));
    const Tensor x = file.at("input").clone().requires_grad_();
    const Tensor out = dense(x);
    check_close(out, file.at("output"), "dense output");
    (out * file.at("grad_output")).sum().backward();
    check_close(x.grad(), file.at("grad.input"), "dense input gradient");
    check_close(dense.weight.grad(), file.at("grad.param.weight"), "dense weight gradient");
    check_close(dense.bias.grad(), file.at("grad.param.bias"), "dense bias gradient");
}

TEST_CASE("RNN, LSTM and GRU match PyTorch: 1 and 2 layers, bidirectional, with lengths")
{
    std::size_t cases = 0;
    for (const std::string prefix : {"rnn_", "lstm_", "gru_"})
        for (const auto& path : testing::reference_files(prefix)) {
            const auto contents = load_with_metadata(path);
            const auto& file = contents.tensors;
            const auto& meta = contents.metadata;
            const std::string kind = meta.at("kind");
            const auto options = nn::RecurrentOptions(std::stoll(meta.at("input_size")), std::stoll(meta.at("hidden_size")))
                                     .num_layers(std::stoll(meta.at("num_layers")))
                                     .bidirectional(meta.at("bidirectional") == "1")
                                     .nonlinearity(kind == "rnn_relu" ? nn::Nonlinearity::ReLU : nn::Nonlinearity::Tanh)
                                     .dtype(kFloat64);
            const bool lstm = kind == "lstm";
            nn::RecurrentLayer layer(lstm ? nn::CellKind::LSTM : kind == "gru" ? nn::CellKind::GRU : nn::CellKind::RNN,
                                     options);
            layer.load_state_dict(parameters_in(file));  // strict: the names are PyTorch's
            const Tensor x = file.at("input").clone().requires_grad_();
            nn::State initial = {file.at("h0").clone().requires_grad_()};
            if (lstm) initial.push_back(file.at("c0").clone().requires_grad_());
            const Tensor lengths = file.count("lengths") ? file.at("lengths") : Tensor();
            const auto out = layer(x, initial, lengths);
            const std::string name = std::filesystem::path(path).stem().string();
            check_close(out.output, file.at("output"), name + " output");
            check_close(out.h_n(), file.at("h_n"), name + " h_n");
            Tensor loss = (out.output * file.at("grad_output")).sum() + (out.h_n() * file.at("grad_h_n")).sum();
            if (lstm) {
                check_close(out.c_n(), file.at("c_n"), name + " c_n");
                loss = loss + (out.c_n() * file.at("grad_c_n")).sum();
            }
            loss.backward();
            check_close(x.grad(), file.at("grad.input"), name + " input gradient");
            check_close(initial[0].grad(), file.at("grad.h0"), name + " h0 gradient");
            if (lstm) check_close(initial[1].grad(), file.at("grad.c0"), name + " c0 gradient");
            for (const auto& [pname, p] : layer.named_parameters())
                check_close(p.grad(), file.at("grad.param." + pname), name + " " + pname + " gradient");
            ++cases;
        }
    CHECK(cases == testing::reference_count("rnn") + testing::reference_count("lstm") + testing::reference_count("gru"));
}

TEST_CASE("MinGRU and MinLSTM match Feng et al.'s equations in PyTorch, log and plain forms")
{
    const auto files = testing::reference_files("minrnn_");
    CHECK(files.size() == testing::reference_count("minrnn"));
    for (const auto& path : files) {
        const auto contents = load_with_metadata(path);
        const auto& file = contents.tensors;
        const auto& meta = contents.metadata;
        const std::string name = std::filesystem::path(path).stem().string();
        const auto options = nn::MinRecurrentOptions(std::stoll(meta.at("input_size")), std::stoll(meta.at("hidden_size")))
                                 .log_space(meta.at("log_space") == "1")
                                 .dtype(kFloat64);
        std::unique_ptr<nn::MinRecurrent> layer;
        if (meta.at("kind") == "mingru") layer = std::make_unique<nn::MinGRU>(options);
        else layer = std::make_unique<nn::MinLSTM>(options);
        layer->load_state_dict(parameters_in(file));  // strict: the names are Feng et al.'s
        const Tensor x = file.at("input").clone().requires_grad_();
        const Tensor h0 = file.count("h0") ? file.at("h0").clone().requires_grad_() : Tensor();
        const auto out = (*layer)(x, h0);
        check_close(out.output, file.at("output"), name + " output");
        check_close(out.h_n(), file.at("h_n"), name + " h_n");
        ((out.output * file.at("grad_output")).sum() + (out.h_n() * file.at("grad_h_n")).sum()).backward();
        check_close(x.grad(), file.at("grad.input"), name + " input gradient");
        if (h0.defined()) check_close(h0.grad(), file.at("grad.h0"), name + " h0 gradient");
        for (const auto& [pname, p] : layer->named_parameters())
            check_close(p.grad(), file.at("grad.param." + pname), name + " " + pname + " gradient");
    }
}

TEST_CASE("SelectiveSSM matches Mamba's block in PyTorch, from zeros and from a given state")
{
    const auto files = testing::reference_files("ssm_");
    CHECK(files.size() == testing::reference_count("ssm"));
    for (const auto& path : files) {
        const auto contents = load_with_metadata(path);
        const auto& file = contents.tensors;
        const auto& meta = contents.metadata;
        const std::string name = std::filesystem::path(path).stem().string();
        nn::SelectiveSSM ssm(nn::SelectiveSSMOptions(std::stoll(meta.at("d_model")))
                                 .d_state(std::stoll(meta.at("d_state")))
                                 .d_conv(std::stoll(meta.at("d_conv")))
                                 .expand(std::stoll(meta.at("expand")))
                                 .dtype(kFloat64));
        ssm.load_state_dict(parameters_in(file));  // strict: the names are Mamba's
        const Tensor x = file.at("input").clone().requires_grad_();
        nn::SelectiveSSMState initial;
        if (file.count("conv0")) initial = {file.at("conv0").clone().requires_grad_(), file.at("ssm0").clone().requires_grad_()};
        const auto out = ssm(x, initial);
        check_close(out.output, file.at("output"), name + " output");
        check_close(out.state.conv, file.at("conv_n"), name + " conv state");
        check_close(out.state.ssm, file.at("ssm_n"), name + " ssm state");
        ((out.output * file.at("grad_output")).sum() + (out.state.conv * file.at("grad_conv_n")).sum() +
         (out.state.ssm * file.at("grad_ssm_n")).sum())
            .backward();
        check_close(x.grad(), file.at("grad.input"), name + " input gradient");
        if (initial.conv.defined()) {
            check_close(initial.conv.grad(), file.at("grad.conv0"), name + " conv0 gradient");
            check_close(initial.ssm.grad(), file.at("grad.ssm0"), name + " ssm0 gradient");
        }
        for (const auto& [pname, p] : ssm.named_parameters())
            check_close(p.grad(), file.at("grad.param." + pname), name + " " + pname + " gradient");
    }
}

TEST_CASE("losses match PyTorch")
{
    std::size_t cases = 0;
    for (const auto& path : testing::reference_files("loss_")) {
        const auto contents = load_with_metadata(path);
        const auto& file = contents.tensors;
        const auto& meta = contents.metadata;
        const std::string loss = meta.at("loss");
        const auto reduction = reduction_of(meta.at("reduction"));
        const Tensor x = file.at("input").clone().requires_grad_();
        Tensor out;
        if (loss == "cross_entropy") {
            nn::CrossEntropyOptions o;
            o.reduction = reduction;
            o.label_smoothing = std::stod(meta.at("label_smoothing"));
            o.ignore_index = std::stoll(meta.at("ignore_index"));
            out = nn::cross_entropy(x, file.at("target"), o);
        } else if (loss == "nll_loss") {
            out = nn::nll_loss(x.log_softmax(1), file.at("target"), std::stoll(meta.at("ignore_index")), reduction);
        } else if (loss == "mse_loss") {
            out = nn::mse_loss(x, file.at("y"), reduction);
        } else {
            REQUIRE(loss == "bce_with_logits");
            out = nn::binary_cross_entropy_with_logits(x * 5.0, file.at("p"), reduction);
        }
        const std::string name = std::filesystem::path(path).stem().string();
        check_close(out, file.at("output"), name + " value");
        (out * file.at("grad_output")).sum().backward();
        check_close(x.grad(), file.at("grad.input"), name + " gradient");
        ++cases;
    }
    CHECK(cases == testing::reference_count("loss"));
}
