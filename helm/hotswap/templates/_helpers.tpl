{{- define "hotswap.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hotswap.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "hotswap.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hotswap.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "hotswap.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "hotswap.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "hotswap.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "hotswap.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "hotswap.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion (ternary "gpu" "cpu" .Values.gpu.enabled)) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "hotswap.apiKeySecret" -}}
{{- default (printf "%s-api-keys" (include "hotswap.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{/* preStop + drain + 10 s of margin, unless the user set a longer grace period. */}}
{{- define "hotswap.gracePeriod" -}}
{{- $derived := add .Values.lifecycle.preStopSleepSeconds .Values.lifecycle.drainTimeoutSeconds 10 -}}
{{- max $derived .Values.terminationGracePeriodSeconds -}}
{{- end -}}
