// Pairing a weight with an input of the wrong width does not compile: fc2 maps the 3072-wide feed-forward
// activations back to 768, so feeding it the 768-wide hidden state is a type error.
use strata::models::Opt125mLayerWeights;
use strata::typed::{linear, Activations};

fn feed_forward_output(layer: &Opt125mLayerWeights, hidden: &Activations<768>) -> Activations<768> {
    linear(&layer.fc2, hidden)
}

fn main() {}
