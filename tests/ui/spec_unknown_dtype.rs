// A dtype strata does not store fails the build with the file, line, column, field and reason.
mod models {
    strata::include_specs!("tests/ui/specs/unknown_dtype");
}

fn main() {}
