/// \file
/// LOOM_OPTION(type, name, default) declares an option with a chained setter and a getter, as in
/// libtorch: LSTMOptions(64, 256).num_layers(2).bidirectional(true); options.num_layers().
#pragma once
#include <utility>

#define LOOM_OPTION(type, name, value)                  \
public:                                                 \
    auto& name(type v)                                  \
    {                                                   \
        name##_ = std::move(v);                         \
        return *this;                                   \
    }                                                   \
    const type& name() const { return name##_; }        \
                                                        \
private:                                                \
    type name##_ = value;
