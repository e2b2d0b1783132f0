// inspect: a tour of loom's tools for looking inside a recurrent network.
//   - the tape of one LSTM step as a text listing and as Graphviz DOT (lstm_step.dot)
//   - anomaly mode naming the op and the scope that made the first NaN
//   - module hooks: the shapes a layer sees, and dL/d(output) of a layer
//   - the gradient report: |grad|, |weight| and update/weight per parameter
//   - a second derivative (create_graph): a gradient-norm penalty
#include <loom/loom.hpp>

#include <CLI/CLI.hpp>

#include <cstdio>
#include <fstream>

using namespace loom;

int main(int argc, char** argv)
{
    CLI::App app{"looking inside: the tape as a graph, anomaly mode, hooks, gradient report, second derivatives"};
    std::string dot_path = "lstm_step.dot";
    app.add_option("--dot", dot_path, "where to write the DOT file of one LSTM step");
    CLI11_PARSE(app, argc, argv);
    manual_seed(0);

    // ---- the tape of one LSTM step ----
    nn::LSTMCell cell(3, 4);
    const Tensor x = randn({2, 3});
    nn::State state = cell.initial_state(2, kFloat32);
    {
        autograd::Scope scope("step 0");
        state = cell(x, state);
    }
    const Tensor loss = state[0].pow(2.0).mean();
    std::printf("== the tape behind one LSTMCell step (autograd::to_text)\n%s",
                autograd::to_text(loss, cell.named_parameters()).c_str());
    std::ofstream(dot_path) << autograd::to_dot(loss, cell.named_parameters());
    std::printf("DOT written to %s (render: dot -Tsvg %s -o lstm_step.svg)\n", dot_path.c_str(), dot_path.c_str());

    // ---- anomaly mode: which op made the first NaN, and where ----
    std::printf("\n== anomaly mode\n");
    nn::Dense decoder(4, 4);
    try {
        autograd::DetectAnomalyGuard anomaly;
        for (int t = 0; t < 5; ++t) {
            autograd::Scope scope(fmt::format("decoder/step {}", t));
            const Tensor h = decoder(state[0]);
            const Tensor energy = t < 3 ? abs(h) + 1.0 : h - 10.0;  // from step 3 on, the energies are negative
            (void)log(energy);                                      // log of a negative number: NaN
        }
    } catch (const Error& e) {
        std::printf("%s\n", e.what());
    }

    // ---- module hooks ----
    std::printf("\n== module hooks on an LSTM layer\n");
    nn::LSTM lstm(nn::LSTMOptions(3, 8));
    auto shapes = lstm.register_forward_hook([](nn::Module& m, const nn::Tensors& in, nn::Tensors& out) {
        std::printf("forward hook: %s(input %s) -> output %s, h_n %s, c_n %s\n", m.type_name().c_str(),
                    fmt::format("{}", in[0].sizes()).c_str(), fmt::format("{}", out[0].sizes()).c_str(),
                    fmt::format("{}", out[1].sizes()).c_str(), fmt::format("{}", out[2].sizes()).c_str());
    });
    auto grads = lstm.register_full_backward_hook([](nn::Module&, nn::Tensors& grad_in, const nn::Tensors& grad_out) {
        std::printf("backward hook: |dL/d output| %.4f, dL/d input %s\n", grad_out[0].norm().item<float>(),
                    grad_in[0].defined() ? "given" : "none (the input needs no gradient)");
    });
    const Tensor seq = randn({10, 2, 3});
    optim::Adam opt(lstm.parameters(), optim::AdamOptions(1e-2));
    const Tensor seq_loss = lstm(seq).output.pow(2.0).mean();
    seq_loss.backward();
    shapes.remove();
    grads.remove();

    // ---- the gradient report ----
    std::printf("\n== gradient report after one Adam step\n");
    const auto before = train::snapshot(lstm.named_parameters());
    opt.step();
    std::printf("%s", train::gradient_report(lstm.named_parameters(), before).table().c_str());

    // ---- a second derivative: penalise the gradient's norm (create_graph) ----
    std::printf("\n== a gradient penalty through a tanh layer (create_graph)\n");
    nn::Dense layer(3, 1);
    const Tensor input = randn({5, 3}).requires_grad_();
    const Tensor out = tanh(layer(input)).sum();
    const Tensor dx = grad({out}, {input}, {}, false, /*create_graph=*/true)[0];
    const Tensor penalty = (dx * dx).sum();
    penalty.backward();
    std::printf("|d out / d input|^2 = %.5f; its gradient w.r.t. the layer's weight: %s\n", penalty.item<float>(),
                fmt::format("{}", layer.weight.grad()).c_str());
    return 0;
}
