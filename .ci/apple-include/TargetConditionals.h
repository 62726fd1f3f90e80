/* For `cargo check --target *-apple-darwin` on Linux (.ci/run) only: the build scripts of some dependencies (ring)
 * compile C that includes the Apple SDK's TargetConditionals.h to ask which Apple OS it targets; the SDK is not on a
 * Linux machine. These answers are macOS's. Nothing built with this header is linked or run. */
#ifndef STRATA_CI_TARGET_CONDITIONALS_H
#define STRATA_CI_TARGET_CONDITIONALS_H
#define TARGET_OS_MAC 1
#define TARGET_OS_OSX 1
#define TARGET_OS_IPHONE 0
#define TARGET_OS_IOS 0
#define TARGET_OS_TV 0
#define TARGET_OS_WATCH 0
#define TARGET_OS_VISION 0
#define TARGET_OS_SIMULATOR 0
#endif
