// A spec without `vocab_size` fails the build with the file, line, column, field and reason.
mod models {
    strata::include_specs!("tests/ui/specs/missing_field");
}

fn main() {}
