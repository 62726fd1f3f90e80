// A tensor of one shape cannot stand in for another: fc1 of opt-125m is 3072 x 768, not opt-1.3b's 8192 x 2048.
use strata::typed::Linear;

fn take_fc1(weights: strata::models::Opt125mWeights) -> Linear<8192, 2048> {
    let [first, ..] = *weights.layers;
    first.fc1
}

fn main() {}
