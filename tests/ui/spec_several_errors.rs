// Every error of every spec in the directory is reported in the same build, not only the first.
mod models {
    strata::include_specs!("tests/ui/specs/several_errors");
}

fn main() {}
