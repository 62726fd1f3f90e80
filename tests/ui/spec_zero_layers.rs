// A model without layers fails the build with the file, line, column, field and reason.
mod models {
    strata::include_specs!("tests/ui/specs/zero_layers");
}

fn main() {}
