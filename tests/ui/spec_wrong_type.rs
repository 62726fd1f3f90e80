// A string where a number belongs fails the build with the file, line, column, field and reason.
mod models {
    strata::include_specs!("tests/ui/specs/wrong_type");
}

fn main() {}
