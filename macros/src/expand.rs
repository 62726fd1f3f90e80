//! Code generation: validated [`ModelDef`]s into Rust items, on `proc_macro2` so it can be unit tested.
//!
//! Everything is emitted with concrete numbers (`Linear<28672, 7168>`): stable Rust cannot compute a const generic
//! argument from another (`{4 * H}`), so the macro does the arithmetic. A `const _: () = assert!(...)` per model
//! then checks those numbers against the runtime's own `const fn`s, so the two can never drift apart silently.

use proc_macro2::{Literal, Span, TokenStream};
use quote::{format_ident, quote};

use crate::diag::Diagnostic;
use crate::spec::{Activation, DType};
use crate::validate::ModelDef;

/// Everything one macro call turns into code.
pub struct Expansion {
    /// The models that passed validation, each with the shown path of its file.
    pub models: Vec<(String, ModelDef)>,
    /// Absolute paths of every spec file read, tracked with `include_str!` so editing one rebuilds.
    pub tracked: Vec<String>,
    /// Every error found; each becomes a `compile_error!`.
    pub errors: Vec<Diagnostic>,
    /// Gate each model's items behind `cfg(any(feature = "all-models", feature = "<feature>"))`.
    pub features: bool,
    /// Where errors are reported (the path literal of the call).
    pub span: Span,
}

/// The feature that enables every model when gating is on.
pub const ALL_MODELS_FEATURE: &str = "all-models";

/// Generates the whole output of one `include_specs!` call.
pub fn expand(e: &Expansion) -> TokenStream {
    let tracked = e.tracked.iter().map(|path| {
        let path = Literal::string(path);
        quote! { const _: &str = ::core::include_str!(#path); }
    });
    let errors = e.errors.iter().map(|d| {
        let msg = Literal::string(&d.to_string());
        let span = e.span;
        quote::quote_spanned! {span=> ::core::compile_error!(#msg); }
    });
    let models = e.models.iter().map(|(path, m)| model(path, m, e.features));
    let lookup = lookup(e);
    quote! {
        #(#tracked)*
        #(#errors)*
        #(#models)*
        #lookup
    }
}

fn lit(v: u64) -> Literal {
    Literal::u64_unsuffixed(v)
}

fn config_ident(m: &ModelDef) -> proc_macro2::Ident {
    format_ident!("__STRATA_CONFIG_{}", m.type_name.to_ascii_uppercase())
}

/// `#[cfg(...)]` for a gated model, nothing otherwise.
fn gate(m: &ModelDef, features: bool) -> TokenStream {
    if features {
        let feature = &m.feature;
        quote! { #[cfg(any(feature = #ALL_MODELS_FEATURE, feature = #feature))] }
    } else {
        TokenStream::new()
    }
}

/// A bool expression saying whether the model is compiled in (for the run-time lists).
fn selected(m: &ModelDef, features: bool) -> TokenStream {
    if features {
        let feature = &m.feature;
        quote! { ::core::cfg!(any(feature = #ALL_MODELS_FEATURE, feature = #feature)) }
    } else {
        quote! { true }
    }
}

/// The `OptConfig` literal of one model.
pub fn config_literal(m: &ModelDef) -> TokenStream {
    let name = &m.name;
    let [l, h, n, f, p, v, s] = [
        m.num_hidden_layers,
        m.hidden_size,
        m.n_head,
        m.ffn_embed_dim,
        m.word_embed_proj_dim,
        m.vocab_size,
        m.max_seq_len,
    ]
    .map(lit);
    let [pad, bos, eos] = [m.pad_token_id, m.bos_token_id, m.eos_token_id].map(|id| lit(id.into()));
    let activation = match m.activation {
        Activation::Relu => quote!(Relu),
        Activation::Gelu => quote!(Gelu),
    };
    let dtype = match m.dtype {
        DType::F16 => quote!(F16),
        DType::BF16 => quote!(BF16),
        DType::F32 => quote!(F32),
    };
    let eps = Literal::f32_suffixed(m.layer_norm_eps);
    let (pre_ln, bias, affine, remove_final, tie) = (
        m.do_layer_norm_before,
        m.enable_bias,
        m.layer_norm_elementwise_affine,
        m.remove_final_layer_norm,
        m.tie_word_embeddings,
    );
    quote! {
        ::strata::OptConfig {
            name: #name,
            num_hidden_layers: #l,
            hidden_size: #h,
            n_head: #n,
            ffn_embed_dim: #f,
            word_embed_proj_dim: #p,
            vocab_size: #v,
            max_seq_len: #s,
            pad_token_id: #pad,
            bos_token_id: #bos,
            eos_token_id: #eos,
            activation: ::strata::Activation::#activation,
            layer_norm_eps: #eps,
            do_layer_norm_before: #pre_ln,
            enable_bias: #bias,
            layer_norm_elementwise_affine: #affine,
            remove_final_layer_norm: #remove_final,
            tie_word_embeddings: #tie,
            dtype: ::strata::DType::#dtype,
        }
    }
}

/// Every item of one model: its config, type, `ModelSpec` impl, drift guard and typed weight structs.
fn model(path: &str, m: &ModelDef, features: bool) -> TokenStream {
    let gate = gate(m, features);
    let ty = format_ident!("{}", m.type_name);
    let layer_ty = format_ident!("{}LayerWeights", m.type_name);
    let weights_ty = format_ident!("{}Weights", m.type_name);
    let config_ident = config_ident(m);
    let config = config_literal(m);
    let name = &m.name;
    let aliases = &m.aliases;
    let (h, f, p, v) = (
        lit(m.hidden_size),
        lit(m.ffn_embed_dim),
        lit(m.word_embed_proj_dim),
        lit(m.vocab_size),
    );
    let (l, heads, head_dim, s) = (
        lit(m.num_hidden_layers),
        lit(m.n_head),
        lit(m.head_dim()),
        lit(m.max_seq_len),
    );
    let positions = lit(m.max_seq_len + 2);
    let (has_projection, has_final_ln) = (m.has_projection(), m.has_final_layer_norm());
    let feature_doc = if features {
        format!(
            " Compiled in with the Cargo feature `{}` (or `{ALL_MODELS_FEATURE}`).",
            m.feature
        )
    } else {
        String::new()
    };
    let type_doc = format!(
        " `{name}`: {} layers, hidden size {}, {} heads of {}, feed-forward {}, vocabulary {}, {} {}{}{}.\n\n \
         Generated from `{path}`.{feature_doc}",
        m.num_hidden_layers,
        m.hidden_size,
        m.n_head,
        m.head_dim(),
        m.ffn_embed_dim,
        m.vocab_size,
        if m.do_layer_norm_before { "pre-LN" } else { "post-LN" },
        match m.activation {
            Activation::Relu => "ReLU",
            Activation::Gelu => "GELU",
        },
        if m.enable_bias { "" } else { ", no biases" },
        if has_projection {
            format!(", embeddings of width {} projected in and out", m.word_embed_proj_dim)
        } else {
            String::new()
        },
    );
    let layer_doc =
        format!(" The weights of one decoder layer of `{name}`, each tensor's shape in its type.");
    let weights_doc = format!(
        " Every weight of `{name}`, each tensor's shape in its type; load with [`{weights}::load`].",
        weights = weights_ty
    );
    let spec_trait = quote!(::strata::ModelSpec);
    let typed = quote!(::strata::typed);

    let linear = |field: &str, out: &Literal, inp: &Literal, doc: &str| {
        let ident = format_ident!("{}", field);
        let doc = format!(" {doc}");
        quote! { #[doc = #doc] pub #ident: #typed::Linear<#out, #inp>, }
    };
    let norm = |field: &str, doc: &str| {
        let ident = format_ident!("{}", field);
        let doc = format!(" {doc}");
        quote! { #[doc = #doc] pub #ident: #typed::LayerNorm<#h>, }
    };
    let layer_fields = [
        linear("k_proj", &h, &h, "Key projection `self_attn.k_proj`."),
        linear("v_proj", &h, &h, "Value projection `self_attn.v_proj`."),
        linear("q_proj", &h, &h, "Query projection `self_attn.q_proj`."),
        linear(
            "out_proj",
            &h,
            &h,
            "Attention output projection `self_attn.out_proj`.",
        ),
        norm(
            "self_attn_layer_norm",
            "Layer norm around attention, `self_attn_layer_norm`.",
        ),
        linear("fc1", &f, &h, "First feed-forward layer `fc1`."),
        linear("fc2", &h, &f, "Second feed-forward layer `fc2`."),
        norm(
            "final_layer_norm",
            "Layer norm around the feed-forward block, `final_layer_norm`.",
        ),
    ];
    let layer_loads = [
        ("k_proj", "self_attn.k_proj", "linear"),
        ("v_proj", "self_attn.v_proj", "linear"),
        ("q_proj", "self_attn.q_proj", "linear"),
        ("out_proj", "self_attn.out_proj", "linear"),
        ("self_attn_layer_norm", "self_attn_layer_norm", "layer_norm"),
        ("fc1", "fc1", "linear"),
        ("fc2", "fc2", "linear"),
        ("final_layer_norm", "final_layer_norm", "layer_norm"),
    ]
    .map(|(field, tensor, kind)| {
        let ident = format_ident!("{}", field);
        let kind = format_ident!("{}", kind);
        let pattern = format!("decoder.layers.{{layer}}.{tensor}");
        quote! { #ident: loader.#kind(&::std::format!(#pattern))?, }
    });

    let mut model_fields = vec![
        quote! {
            /// Token embedding `decoder.embed_tokens.weight` (also the tied LM head).
            pub embed_tokens: #typed::Matrix<#v, #p>,
            /// Learned positions `decoder.embed_positions.weight` (`max_seq_len + 2` rows).
            pub embed_positions: #typed::Matrix<#positions, #h>,
        },
        quote! {
            /// The decoder layers, in order.
            pub layers: ::std::boxed::Box<[#layer_ty; #l]>,
        },
    ];
    let mut model_loads = vec![quote! {
        let embed_tokens = loader.matrix("decoder.embed_tokens.weight")?;
        let embed_positions = loader.matrix("decoder.embed_positions.weight")?;
    }];
    let mut model_inits = vec![quote!(embed_tokens, embed_positions, layers,)];
    if has_projection {
        model_fields.push(quote! {
            /// `decoder.project_in`: embedding width to hidden width.
            pub project_in: #typed::Linear<#h, #p>,
            /// `decoder.project_out`: hidden width back to embedding width.
            pub project_out: #typed::Linear<#p, #h>,
        });
        model_loads.push(quote! {
            let project_in = loader.linear("decoder.project_in")?;
            let project_out = loader.linear("decoder.project_out")?;
        });
        model_inits.push(quote!(project_in, project_out,));
    }
    if has_final_ln {
        model_fields.push(quote! {
            /// The decoder's final layer norm `decoder.final_layer_norm`.
            pub final_layer_norm: #typed::LayerNorm<#h>,
        });
        model_loads.push(
            quote! { let final_layer_norm = loader.layer_norm("decoder.final_layer_norm")?; },
        );
        model_inits.push(quote!(final_layer_norm,));
    }
    if !m.tie_word_embeddings {
        model_fields.push(quote! {
            /// The untied LM head `lm_head.weight`.
            pub lm_head: #typed::Matrix<#v, #p>,
        });
        model_loads.push(quote! { let lm_head = loader.matrix("lm_head.weight")?; });
        model_inits.push(quote!(lm_head,));
    }

    quote! {
        #[doc(hidden)]
        const #config_ident: ::strata::OptConfig = #config;

        #[doc = #type_doc]
        #gate
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        pub struct #ty;

        #gate
        impl #spec_trait for #ty {
            const CONFIG: ::strata::OptConfig = #config_ident;
            const NAME: &'static str = #name;
            const ALIASES: &'static [&'static str] = &[#(#aliases),*];
            const NUM_HIDDEN_LAYERS: usize = #l;
            const HIDDEN_SIZE: usize = #h;
            const N_HEAD: usize = #heads;
            const HEAD_DIM: usize = #head_dim;
            const FFN_EMBED_DIM: usize = #f;
            const WORD_EMBED_PROJ_DIM: usize = #p;
            const VOCAB_SIZE: usize = #v;
            const MAX_SEQ_LEN: usize = #s;
            const NUM_POSITIONS: usize = #positions;
            type LayerWeights = #layer_ty;
            type Weights = #weights_ty;

            fn load_weights(
                source: &dyn ::strata::weights::WeightSource,
            ) -> ::core::result::Result<#weights_ty, #typed::LoadError> {
                #weights_ty::load(source)
            }
        }

        // The numbers above were computed by the macro; the runtime's const fns must agree with them.
        #gate
        const _: () = {
            let c = <#ty as #spec_trait>::CONFIG;
            ::core::assert!(c.head_dim() == #head_dim, "macro and runtime disagree on head_dim");
            ::core::assert!(c.num_positions() == #positions, "macro and runtime disagree on num_positions");
            ::core::assert!(c.has_projection() == #has_projection, "macro and runtime disagree on projections");
            ::core::assert!(c.has_final_layer_norm() == #has_final_ln, "macro and runtime disagree on the final layer norm");
        };

        #[doc = #layer_doc]
        #gate
        #[derive(Debug)]
        pub struct #layer_ty {
            #(#layer_fields)*
        }

        #gate
        impl #layer_ty {
            /// Loads decoder layer `layer`, checking every tensor's shape against this type.
            pub fn load(
                loader: &mut #typed::WeightLoader<'_>,
                layer: usize,
            ) -> ::core::result::Result<Self, #typed::LoadError> {
                ::core::result::Result::Ok(Self { #(#layer_loads)* })
            }
        }

        #[doc = #weights_doc]
        #gate
        #[derive(Debug)]
        pub struct #weights_ty {
            #(#model_fields)*
        }

        #gate
        impl #weights_ty {
            /// Reads every tensor of the model from `source`, checking each shape at run time against the one this
            /// type fixes at compile time, and that no tensor the runtime's list (`model_tensors`) requires is left.
            pub fn load(
                source: &dyn ::strata::weights::WeightSource,
            ) -> ::core::result::Result<Self, #typed::LoadError> {
                let mut loader = #typed::WeightLoader::new(source, &<#ty as #spec_trait>::CONFIG)?;
                #(#model_loads)*
                let mut layers = ::std::vec::Vec::with_capacity(#l);
                for layer in 0..#l {
                    layers.push(#layer_ty::load(&mut loader, layer)?);
                }
                let layers = #typed::boxed_array(layers, #name)?;
                loader.finish()?;
                ::core::result::Result::Ok(Self { #(#model_inits)* })
            }
        }
    }
}

/// `ALL`, `ALIASES` and `resolve`: the run-time view of the models compiled in.
fn lookup(e: &Expansion) -> TokenStream {
    let Some((_, first)) = e.models.first() else {
        // Every spec failed; the compile errors say why, and there is nothing to list.
        return TokenStream::new();
    };
    let fill = config_ident(first);
    let candidates = e.models.iter().map(|(_, m)| {
        let (on, c) = (selected(m, e.features), config_ident(m));
        quote! { (#on, &#c) }
    });
    let alias_candidates = e.models.iter().flat_map(|(_, m)| {
        let (on, c) = (selected(m, e.features), config_ident(m));
        m.aliases
            .iter()
            .map(move |a| quote! { (#on, (#a, &#c)) })
            .collect::<Vec<_>>()
    });
    let (n, k) = (
        e.models.len(),
        e.models.iter().map(|(_, m)| m.aliases.len()).sum::<usize>(),
    );
    let support = quote!(::strata::__macro_support);
    quote! {
        #[doc(hidden)]
        const __STRATA_MODELS: [(bool, &::strata::OptConfig); #n] = [#(#candidates),*];
        #[doc(hidden)]
        const __STRATA_ALIASES: [(bool, (&str, &::strata::OptConfig)); #k] = [#(#alias_candidates),*];

        /// The config of every model compiled into this build, in spec file order.
        pub const ALL: &[&::strata::OptConfig] = {
            const SELECTED: [&::strata::OptConfig; #support::count_selected(&__STRATA_MODELS)] =
                #support::select(&__STRATA_MODELS, &#fill);
            &SELECTED
        };

        /// Other names of the models in [`ALL`]: `(alias, config)`.
        pub const ALIASES: &[(&str, &::strata::OptConfig)] = {
            const SELECTED: [(&str, &::strata::OptConfig); #support::count_selected(&__STRATA_ALIASES)] =
                #support::select(&__STRATA_ALIASES, ("", &#fill));
            &SELECTED
        };

        /// Resolves a user's model name against [`ALL`] and [`ALIASES`] the way FlexLLMGen's `get_opt_config` does
        /// (organisation prefix, case, `-iml` / `-iml-max` variants).
        pub fn resolve(name: &str) -> ::core::result::Result<::strata::ResolvedModel, ::strata::UnknownModel> {
            ::strata::resolve_in(name, ALL, ALIASES)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diag::{Ctxt, SpecFile};
    use crate::{spec, validate};

    fn model_from(text: &str) -> ModelDef {
        let file = SpecFile::new("specs/opt-125m.toml", text);
        let mut cx = Ctxt::new();
        let raw = spec::parse(&file, &mut cx);
        validate::validate(&file, &raw, &mut cx, 0).expect("valid spec")
    }

    fn expansion(models: Vec<ModelDef>, features: bool) -> Expansion {
        Expansion {
            models: models
                .into_iter()
                .map(|m| ("specs/opt-125m.toml".to_owned(), m))
                .collect(),
            tracked: vec!["/abs/specs/opt-125m.toml".into()],
            errors: Vec::new(),
            features,
            span: Span::call_site(),
        }
    }

    /// Token text without spaces, so checks do not depend on how `quote` spaces punctuation.
    fn squash(tokens: &TokenStream) -> String {
        tokens
            .to_string()
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect()
    }

    #[test]
    fn the_output_parses_as_rust_items() {
        let m = model_from(spec::tests::OPT_125M);
        let out = expand(&expansion(vec![m], true));
        let file: syn::File = syn::parse2(out).expect("generated code is valid Rust");
        let structs: Vec<String> = file
            .items
            .iter()
            .filter_map(|item| match item {
                syn::Item::Struct(s) => Some(s.ident.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(
            structs,
            ["Opt125m", "Opt125mLayerWeights", "Opt125mWeights"]
        );
    }

    #[test]
    fn shapes_are_concrete_numbers() {
        let m = model_from(spec::tests::OPT_125M);
        let out = squash(&expand(&expansion(vec![m], false)));
        assert!(
            out.contains("pubfc1:::strata::typed::Linear<3072,768>"),
            "{out}"
        );
        assert!(out.contains("pubfc2:::strata::typed::Linear<768,3072>"));
        assert!(out.contains("pubembed_positions:::strata::typed::Matrix<2050,768>"));
        assert!(out.contains("pubembed_tokens:::strata::typed::Matrix<50272,768>"));
        assert!(out.contains("constHEAD_DIM:usize=64;"));
        assert!(out.contains("layers:::std::boxed::Box<[Opt125mLayerWeights;12]>"));
        // Tied, pre-LN, no projection: a final layer norm, no lm_head, no project_in.
        assert!(out.contains("pubfinal_layer_norm:::strata::typed::LayerNorm<768>,}"));
        assert!(!out.contains("lm_head:") && !out.contains("project_in:"));
        assert!(out.contains("include_str!(\"/abs/specs/opt-125m.toml\")"));
    }

    #[test]
    fn post_ln_projected_models_get_projections_and_no_final_norm() {
        let text = spec::tests::OPT_125M
            .replace("word_embed_proj_dim = 768", "word_embed_proj_dim = 512")
            .replace(
                "do_layer_norm_before = true",
                "do_layer_norm_before = false",
            )
            .replace(
                "enable_bias = true",
                "enable_bias = true\ntie_word_embeddings = false",
            );
        let out = squash(&expand(&expansion(vec![model_from(&text)], false)));
        assert!(
            out.contains("pubproject_in:::strata::typed::Linear<768,512>"),
            "{out}"
        );
        assert!(out.contains("pubproject_out:::strata::typed::Linear<512,768>"));
        assert!(out.contains("pubembed_tokens:::strata::typed::Matrix<50272,512>"));
        assert!(out.contains("publm_head:::strata::typed::Matrix<50272,512>"));
        assert!(!out.contains("letfinal_layer_norm="));
    }

    #[test]
    fn config_literal_carries_every_value() {
        let text = spec::tests::OPT_125M
            .replace("\"relu\"", "\"gelu\"")
            .replace("enable_bias = true", "enable_bias = false")
            .replace("\"float16\"", "\"bf16\"");
        let out = squash(&config_literal(&model_from(&text)));
        for part in [
            "name:\"opt-125m\"",
            "num_hidden_layers:12,",
            "vocab_size:50272,",
            "eos_token_id:2,",
            "activation:::strata::Activation::Gelu",
            "layer_norm_eps:0.00001f32",
            "enable_bias:false",
            "tie_word_embeddings:true",
            "dtype:::strata::DType::BF16",
        ] {
            assert!(out.contains(part), "{part} missing from {out}");
        }
    }

    #[test]
    fn gating_is_opt_in() {
        let m = model_from(spec::tests::OPT_125M);
        let gated = squash(&expand(&expansion(vec![m.clone()], true)));
        assert!(gated.contains("#[cfg(any(feature=\"all-models\",feature=\"opt-125m\"))]#[derive(Clone,Copy,Debug,Default,PartialEq,Eq,Hash)]pubstructOpt125m;"), "{gated}");
        assert!(gated.contains("(::core::cfg!(any(feature=\"all-models\",feature=\"opt-125m\")),&__STRATA_CONFIG_OPT125M)"));
        let plain = squash(&expand(&expansion(vec![m], false)));
        assert!(!plain.contains("cfg"), "{plain}");
    }

    #[test]
    fn errors_become_compile_errors_and_files_stay_tracked() {
        let mut e = expansion(Vec::new(), false);
        e.errors.push(Diagnostic {
            path: "specs/x.toml".into(),
            at: Some((3, 7)),
            field: Some("n_head".into()),
            message: "bad".into(),
        });
        let out = squash(&expand(&e));
        assert_eq!(
            out,
            "const_:&str=::core::include_str!(\"/abs/specs/opt-125m.toml\");\
             ::core::compile_error!(\"specs/x.toml:3:7:`n_head`:bad\");"
        );
    }
}
