// status_macros.h — the early-return macros of weightd's own code (internal). They are not in
// the public weightd/status.h, so that no program that includes libweightd's headers gets
// unprefixed macro names from it.
#pragma once

#include <utility>

#include "weightd/status.h"

#define WEIGHTD_CONCAT_INNER_(a, b) a##b
#define WEIGHTD_CONCAT_(a, b) WEIGHTD_CONCAT_INNER_(a, b)

// Returns the Status of `expr` from the enclosing function if it is not OK.
#define RETURN_IF_ERROR(expr)                          \
  do {                                                 \
    ::weightd::Status weightd_status_ = (expr);        \
    if (!weightd_status_.ok()) return weightd_status_; \
  } while (0)

// `ASSIGN_OR_RETURN(auto x, F())` declares x from a Result or returns its error.
#define ASSIGN_OR_RETURN(lhs, rexpr) \
  WEIGHTD_ASSIGN_OR_RETURN_IMPL_(WEIGHTD_CONCAT_(weightd_result_, __LINE__), lhs, rexpr)
#define WEIGHTD_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                                   \
  if (!tmp.ok()) return tmp.status();                   \
  lhs = std::move(tmp).value()
