// Heads that do not divide the hidden size fails the build with the file, line, column, field and reason.
mod models {
    strata::include_specs!("tests/ui/specs/n_head_divides");
}

fn main() {}
