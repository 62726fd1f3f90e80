// An activation OPT does not have fails the build with the file, line, column, field and reason.
mod models {
    strata::include_specs!("tests/ui/specs/unknown_activation");
}

fn main() {}
